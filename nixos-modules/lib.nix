# Helpers shared by the nix-farm NixOS and nix-darwin modules.
#
# Pure functions of nixpkgs' `lib`; no `pkgs`, so the option evaluation check
# (`nixos-modules/check.sh`) can exercise every one of them without nixpkgs.
{ lib }:
let
  inherit (lib)
    attrValues
    concatMap
    concatMapStringsSep
    concatStringsSep
    filter
    filterAttrs
    foldl'
    isAttrs
    isList
    mapAttrsToList
    replaceStrings
    sort
    stringLength
    substring
    types
    unique
    ;

  sortedUnique = xs: sort lib.lessThan (unique xs);

  # ---------------------------------------------------------------- TOML
  # A TOML document from a Nix attribute set, written without any build-time
  # tool so the generated file can be checked at evaluation time. `null`
  # values are left out (TOML has no null): that is how a setting is unset.
  bareKey = k: builtins.match "[A-Za-z0-9_-]+" k != null;
  tomlKey = k: if bareKey k then k else builtins.toJSON k;

  isTable = v: isAttrs v && !(lib.isDerivation v);
  isArrayOfTables = v: isList v && v != [ ] && lib.all isTable v;

  # JSON string escapes (\" \\ \n \t \uXXXX ...) are all valid in a TOML basic
  # string; numbers and booleans are spelled the same way in both.
  inlineValue =
    v:
    if isTable v then
      "{ "
      + concatStringsSep ", " (
        mapAttrsToList (k: x: "${tomlKey k} = ${inlineValue x}") (filterAttrs (_: x: x != null) v)
      )
      + " }"
    else if isList v then
      "[ " + concatMapStringsSep ", " inlineValue (filter (x: x != null) v) + " ]"
    else if lib.isDerivation v then
      builtins.toJSON "${v}"
    else
      builtins.toJSON v;

  # `[a.b]` header, then its key/values, then its sub-tables and arrays of
  # tables (TOML wants a table's own keys before any sub-table header).
  tomlTable =
    path: attrs:
    (if path == [ ] then "" else "\n[${concatMapStringsSep "." tomlKey path}]\n")
    + tomlTableBody path attrs;

  tomlTableBody =
    path: attrs:
    let
      set = filterAttrs (_: v: v != null) attrs;
      plain = filterAttrs (_: v: !(isTable v) && !(isArrayOfTables v)) set;
      tables = filterAttrs (_: isTable) set;
      arrays = filterAttrs (_: isArrayOfTables) set;
      arrayElement =
        p: t: "\n[[${concatMapStringsSep "." tomlKey p}]]\n" + tomlTableBody p t;
    in
    concatStringsSep "" (mapAttrsToList (k: v: "${tomlKey k} = ${inlineValue v}\n") plain)
    + concatStringsSep "" (mapAttrsToList (k: v: tomlTable (path ++ [ k ]) v) tables)
    + concatStringsSep "" (
      mapAttrsToList (k: vs: concatMapStringsSep "" (arrayElement (path ++ [ k ])) vs) arrays
    );

  # ---------------------------------------------------------------- base64
  # Nix has no base64 builtin; `nix.buildMachines.*.publicHostKey` wants the
  # host key line base64-encoded. Printable ASCII is all an OpenSSH public key
  # line holds.
  printable = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";
  asciiCodes = builtins.listToAttrs (
    builtins.genList (i: {
      name = substring i 1 printable;
      value = i + 32;
    }) (stringLength printable)
  );
  b64Alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  b64Char = i: substring i 1 b64Alphabet;
  byteOf =
    c: asciiCodes.${c} or (throw "nix-farm: base64 input must be printable ASCII, found ${builtins.toJSON c}");

  toBase64 =
    s:
    let
      bytes = map byteOf (lib.stringToCharacters s);
      n = builtins.length bytes;
      at = i: if i < n then builtins.elemAt bytes i else 0;
      group =
        g:
        let
          i = g * 3;
          v = (at i) * 65536 + (at (i + 1)) * 256 + (at (i + 2));
          c0 = b64Char (v / 262144);
          c1 = b64Char (lib.mod (v / 4096) 64);
          c2 = if i + 1 < n then b64Char (lib.mod (v / 64) 64) else "=";
          c3 = if i + 2 < n then b64Char (lib.mod v 64) else "=";
        in
        c0 + c1 + c2 + c3;
    in
    concatStringsSep "" (builtins.genList group ((n + 2) / 3));
in
{
  inherit toBase64;

  # The nixpkgs `formats` interface (`type`, `generate`) for the farm's TOML
  # config files, with the text itself available as `toTOML`.
  toml = {
    type =
      let
        valueType =
          types.nullOr (
            types.oneOf [
              types.bool
              types.int
              types.float
              types.str
              types.path
              (types.attrsOf valueType)
              (types.listOf valueType)
            ]
          )
          // {
            description = "TOML value";
          };
      in
      types.attrsOf valueType;
    toTOML = tomlTable [ ];
    generate = writeText: name: value: writeText name (tomlTable [ ] value);
  };

  # One argument of a systemd `ExecStart=` line: double-quoted, with systemd's
  # specifier (`%`) and variable (`$`) characters escaped, so the program sees
  # exactly the string given.
  escapeSystemdArg =
    s:
    "\""
    + replaceStrings [ "\\" "\"" "%" "$" "\n" ] [ "\\\\" "\\\"" "%%" "$$" "\\n" ] (toString s)
    + "\"";

  # Where `LoadCredential=NAME:…` puts a credential, as an `ExecStart=` word.
  credentialArg = name: "%d/${name}";

  # Repeat a flag once per value: `[ "--system" "a" "--system" "b" ]`.
  repeatFlag = flag: concatMap (v: [ flag (toString v) ]);

  # The one machine the farm is to Nix: what `farm machines` prints, from the
  # same inputs the coordinator schedules with (each builder's advertisement).
  #   systems            every system some builder builds (sorted, unique)
  #   maxJobs            the sum of the builders' job slots
  #   speedFactor        the fastest builder's speed factor
  #   supportedFeatures  every feature some builder supports or requires
  #   mandatoryFeatures  the features every builder requires (usually none)
  # `supportedFeatures` here excludes the mandatory ones, because
  # `nix.buildMachines` writes supported ++ mandatory into that column.
  farmMachine =
    builders:
    let
      bs = attrValues builders;
      mandatory =
        if bs == [ ] then
          [ ]
        else
          sortedUnique (
            foldl' (acc: b: filter (f: builtins.elem f b.mandatoryFeatures) acc) (builtins.head bs)
              .mandatoryFeatures (builtins.tail bs)
          );
      supported = sortedUnique (concatMap (b: b.supportedFeatures ++ b.mandatoryFeatures) bs);
    in
    {
      systems = sortedUnique (concatMap (b: b.systems) bs);
      maxJobs = foldl' (acc: b: acc + b.maxJobs) 0 bs;
      speedFactor = foldl' (acc: b: lib.max acc b.speedFactor) 1 bs;
      supportedFeatures = filter (f: !(builtins.elem f mandatory)) supported;
      mandatoryFeatures = mandatory;
    };
}
