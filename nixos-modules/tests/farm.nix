# NixOS VM test: a coordinator, two builders and a client. The client builds
# two derivations through the farm; each needs a feature only one builder
# has, so each must go to that builder. The outputs come back to the client,
# are published signed in the farm cache, and are substituted from it.
#
# Run: nix build .#checks.x86_64-linux.nixos-farm -L
{
  # NixOS modules with their package set: { coordinator, builder, client }.
  modules,
}:
{ pkgs, lib, ... }:
let
  system = pkgs.stdenv.hostPlatform.system;

  # A CA and a certificate for the coordinator's gRPC listener, made at build
  # time; the builders pin the CA.
  tls = pkgs.runCommand "nix-farm-test-tls" { nativeBuildInputs = [ pkgs.openssl ]; } ''
    mkdir $out && cd $out
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500 \
      -subj /CN=nix-farm-test-ca -keyout ca.key -out ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj /CN=coordinator -keyout key.pem -out req.csr
    printf 'subjectAltName=DNS:coordinator\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext
    openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 36500 \
      -extfile ext -out cert.pem
  '';

  features = {
    builder1 = "farm-test-a";
    builder2 = "farm-test-b";
  };

  builderNode =
    name:
    { ... }:
    {
      imports = [ modules.builder ];
      services.nix-farm.builder = {
        enable = true;
        coordinator = "https://coordinator:7070";
        caCertFile = "${tls}/ca.pem";
        keyFile = "${./keys}/${name}";
        maxJobs = 2;
        systems = [ system ];
        supportedFeatures = [ features.${name} ];
      };
    };

  testExpr = pkgs.writeText "farm-test.nix" ''
    let
      build = feature: derivation {
        name = feature;
        system = "${system}";
        builder = "/bin/sh";
        args = [ "-c" "echo built-on-the-farm > $out" ];
        requiredSystemFeatures = [ feature ];
      };
    in
    {
      a = build "${features.builder1}";
      b = build "${features.builder2}";
    }
  '';
in
{
  name = "nix-farm";

  nodes = {
    coordinator =
      { ... }:
      {
        imports = [ modules.coordinator ];
        services.nix-farm.coordinator = {
          enable = true;
          publicHost = "coordinator";
          openFirewall = true;
          cacheKeyFile = "${./keys}/cache-key";
          authorizedKeys.keyFiles = [ ./keys/client.pub ];
          builderKeys.keyFiles = [
            ./keys/builder1.pub
            ./keys/builder2.pub
          ];
          tls = {
            certificateFile = "${tls}/cert.pem";
            keyFile = "${tls}/key.pem";
          };
        };
      };

    builder1 = builderNode "builder1";
    builder2 = builderNode "builder2";

    client =
      { ... }:
      {
        imports = [ modules.client ];
        services.nix-farm.client = {
          enable = true;
          host = "coordinator";
          sshKey = "/etc/nix-farm/client_ed25519";
          # What the builders above advertise.
          builders = lib.mapAttrs (_: feature: {
            systems = [ system ];
            maxJobs = 2;
            supportedFeatures = [ feature ];
          }) features;
          cache.publicKey = lib.fileContents ./keys/cache-key.pub;
        };
        # Everything must be built on the farm.
        nix.settings.max-jobs = 0;
        environment.etc."nix-farm/client_ed25519" = {
          source = ./keys/client;
          mode = "0600";
        };
        environment.etc."farm-test.nix".source = testExpr;
        environment.systemPackages = [ pkgs.curl ];
      };
  };

  testScript = ''
    import json

    start_all()
    coordinator.wait_for_unit("nix-farm-coordinator.service")
    coordinator.wait_for_file("/var/lib/nix-farm-coordinator/endpoints.json")
    endpoints = json.loads(coordinator.succeed("cat /var/lib/nix-farm-coordinator/endpoints.json"))
    assert endpoints["cache_public_key"] == "${lib.fileContents ./keys/cache-key.pub}", endpoints

    builder1.wait_for_unit("nix-farm-builder.service")
    builder2.wait_for_unit("nix-farm-builder.service")

    # The coordinator generates its SSH host key on first start; the client's
    # nix-daemon (root) learns it here (services.nix-farm.client.hostKey is
    # the declarative way once the key is known).
    client.succeed("mkdir -p -m 700 /root/.ssh")
    client.succeed(f"echo 'coordinator {endpoints['ssh_host_key']}' > /root/.ssh/known_hosts")
    client.succeed("grep -q 'http://coordinator:7080' /etc/nix/nix.conf")

    with subtest("each derivation is built by the one builder with its feature"):
        out_a = client.wait_until_succeeds("nix-build --no-out-link /etc/farm-test.nix -A a", timeout=300).strip()
        out_b = client.succeed("nix-build --no-out-link /etc/farm-test.nix -A b").strip()
        client.succeed(f"grep -q built-on-the-farm {out_a} {out_b}")
        builder1.succeed(f"test -e {out_a}")
        builder1.fail(f"test -e {out_b}")
        builder2.succeed(f"test -e {out_b}")
        builder2.fail(f"test -e {out_a}")

    with subtest("outputs are in the farm cache, signed, and substitutable"):
        hash_a = out_a.removeprefix("/nix/store/")[:32]
        narinfo = client.succeed(f"curl -fsS http://coordinator:7080/{hash_a}.narinfo")
        assert "Sig: nix-farm-test-1:" in narinfo, narinfo
        client.succeed(f"nix-store --delete {out_a}")
        client.succeed(f"nix-store --realise {out_a}")
        client.succeed(f"grep -q built-on-the-farm {out_a}")
  '';
}
