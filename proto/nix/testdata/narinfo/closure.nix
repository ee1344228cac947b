let
  dep = derivation { name = "dep"; system = "x86_64-linux"; builder = "/bin/sh";
                     args = [ "-c" "echo dep > $out" ]; };
in derivation { name = "top"; system = "x86_64-linux"; builder = "/bin/sh";
                args = [ "-c" "echo ${dep} > $out" ]; }
