# Evaluates the nix-farm modules with nixpkgs' own module system
# (`lib.evalModules`), without NixOS: the NixOS and nix-darwin options the
# modules set are declared here by stand-ins, typed loosely where their exact
# type does not matter and like the real ones where it does (`nix.settings`
# list merging and defaults, every field of `nix.buildMachines`).
#
# Used by ../check.sh, which checks the result against the real binaries and
# renders docs/options.md from `docs`.
{
  # Path of a nixpkgs `lib` directory.
  nixpkgsLib,
  # Directory standing in for the nix-farm package's output (has bin/).
  packageDir,
  # Directory standing in for the Nix package's output (has bin/nix-store...).
  nixDir,
}:
let
  lib = import nixpkgsLib;
  inherit (lib) mkOption types;
  loose = types.attrsOf types.anything;

  fakePackage = name: outPath: {
    type = "derivation";
    inherit name outPath;
  };
  pkgs = {
    stdenv.hostPlatform.system = "x86_64-linux";
    nix-farm = fakePackage "nix-farm" packageDir;
    openssl = fakePackage "openssl" "/nix/store/00000000000000000000000000000000-openssl";
    curl = fakePackage "curl" "/nix/store/00000000000000000000000000000000-curl";
    # The VM test's build-time TLS material: only its path matters here.
    runCommand = name: _env: _script: fakePackage name "/nix/store/00000000000000000000000000000000-${name}";
    # Evaluated with --read-write-mode into a throw-away chroot store, so the
    # check can read back every generated file.
    writeText = name: text: builtins.toFile name text;
  };

  # ------------------------------------------------ shared stand-ins
  common =
    { ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        networking.hostName = mkOption {
          type = types.str;
          default = "nixos";
        };
        nix.package = mkOption {
          type = types.package;
          default = fakePackage "nix" nixDir;
        };
        # Like NixOS/nix-darwin: a freeform submodule whose list settings
        # concatenate, with the defaults a definition would replace.
        nix.settings = mkOption {
          default = { };
          type = types.submodule {
            freeformType = types.attrsOf (
              types.oneOf [
                (types.listOf types.str)
                types.bool
                types.int
                types.str
              ]
            );
            options = {
              system-features = mkOption {
                type = types.listOf types.str;
                default = [
                  "nixos-test"
                  "benchmark"
                  "big-parallel"
                  "kvm"
                ];
              };
              trusted-users = mkOption {
                type = types.listOf types.str;
                default = [ "root" ];
              };
              substituters = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
              trusted-public-keys = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
            };
          };
        };
      };
      config._module.args.pkgs = pkgs;
    };

  nixosStandIns =
    { ... }:
    {
      imports = [ common ];
      options = {
        systemd.services = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              freeformType = loose;
              options.serviceConfig = mkOption {
                type = loose;
                default = { };
              };
              options.path = mkOption {
                type = types.listOf types.package;
                default = [ ];
              };
            }
          );
        };
        users.users = mkOption {
          type = types.attrsOf loose;
          default = { };
        };
        users.groups = mkOption {
          type = types.attrsOf loose;
          default = { };
        };
        networking.firewall.allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        services.openssh.enable = mkOption {
          type = types.bool;
          default = false;
        };
        services.openssh.hostKeys = mkOption {
          type = types.listOf loose;
          default = [
            {
              type = "rsa";
              bits = 4096;
              path = "/etc/ssh/ssh_host_rsa_key";
            }
            {
              type = "ed25519";
              path = "/etc/ssh/ssh_host_ed25519_key";
            }
          ];
        };
        programs.ssh.extraConfig = mkOption {
          type = types.lines;
          default = "";
        };
        programs.ssh.knownHosts = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              options.hostNames = mkOption { type = types.listOf types.str; };
              options.publicKey = mkOption { type = types.str; };
            }
          );
        };
        nix.distributedBuilds = mkOption {
          type = types.bool;
          default = false;
        };
        # Every field NixOS declares for a build machine, so a misspelt one fails.
        nix.buildMachines = mkOption {
          default = [ ];
          type = types.listOf (
            types.submodule {
              options = {
                hostName = mkOption { type = types.str; };
                protocol = mkOption {
                  type = types.enum [
                    null
                    "ssh"
                    "ssh-ng"
                  ];
                  default = "ssh";
                };
                sshUser = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                sshKey = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                system = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                systems = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                };
                maxJobs = mkOption {
                  type = types.int;
                  default = 1;
                };
                speedFactor = mkOption {
                  type = types.int;
                  default = 1;
                };
                supportedFeatures = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                };
                mandatoryFeatures = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                };
                publicHostKey = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
              };
            }
          );
        };
      };
    };

  darwinStandIns =
    { ... }:
    {
      imports = [ common ];
      options = {
        launchd.daemons = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              options.serviceConfig = mkOption {
                type = loose;
                default = { };
              };
            }
          );
        };
        system.activationScripts = mkOption {
          default = { };
          type = types.attrsOf (types.submodule { options.text = mkOption { type = types.lines; }; });
        };
      };
    };

  # What the VM test's nodes set besides the farm options.
  testStandIns =
    { ... }:
    {
      options.environment.etc = mkOption {
        type = types.attrsOf loose;
        default = { };
      };
      options.environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
    };

  # flake.nix's outputs, with nixpkgs standing in as its lib and the package
  # as the stand-in one.
  flake =
    let
      outputs = (import ../../flake.nix).outputs {
        self = flake;
        nixpkgs = {
          inherit lib;
          legacyPackages = throw "the check evaluates no nixpkgs packages";
        };
      };
    in
    outputs
    // {
      packages = lib.genAttrs [ "x86_64-linux" "aarch64-darwin" ] (_: {
        default = pkgs.nix-farm;
      });
    };

  # The nodes of the VM test (nixos-modules/tests/farm.nix), through the
  # flake's nixosModules.
  vmTest = import ../tests/farm.nix { modules = flake.nixosModules; } { inherit pkgs lib; };
  vmNodes = lib.mapAttrs (
    name: node:
    lib.evalModules {
      modules = [
        nixosStandIns
        testStandIns
        node
        # The test driver names each machine after its node.
        { networking.hostName = lib.mkDefault name; }
      ];
    }
  ) vmTest.nodes;

  nixos =
    modules:
    lib.evalModules {
      modules = [
        nixosStandIns
        ../coordinator.nix
        ../builder.nix
        ../client.nix
      ]
      ++ modules;
    };
  darwin =
    modules:
    lib.evalModules {
      modules = [
        darwinStandIns
        ../darwin-builder.nix
      ]
      ++ modules;
    };

  # ------------------------------------------------ one farm, declared once
  farmHost = "farm.example.test";
  farmHostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq7mWKtJ0dYg0l7Zc2c3o0j0fQ5j8m4W1m1sQvGkP3R root@coordinator";
  cachePublicKey = "farm.example.test-1:Q2hlY2tDaGVja0NoZWNrQ2hlY2tDaGVja0NoZWNrQ2g=";

  hosts = {
    coordinator = nixos [
      {
        networking.hostName = "coordinator";
        services.nix-farm.coordinator = {
          enable = true;
          publicHost = farmHost;
          openFirewall = true;
          grpc.listenAddress = "0.0.0.0";
          http.port = 8080;
          cacheKeyName = "farm.example.test-1";
          cacheKeyFile = "/run/secrets/nix-farm-cache-key";
          authorizedKeys.keys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClientKeyClientKeyClientKeyClientKeyCl client" ];
          adminKeys.keys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyAdminKeyAdminKeyAdminKeyAdminKe admin" ];
          builderKeys.keys = [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuilderOneBuilderOneBuilderOneBuilderOne b1"
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuilderTwoBuilderTwoBuilderTwoBuilderTwo b2"
          ];
          tls = {
            mode = "on";
            # A space and a % show the ExecStart quoting holds.
            certificateFile = "/var/lib/acme/farm 100%/fullchain.pem";
            keyFile = "/var/lib/acme/farm/key.pem";
          };
          alerts = {
            ntfyUrlFile = "/run/secrets/nix-farm-ntfy-url";
            webhookUrl = "https://hooks.example.test/farm";
            builderOfflineSeconds = 600;
            jobs = [
              "ci/app"
              "ci/docs"
            ];
            cacheMaxBytes = 1099511627776;
          };
          settings = {
            zstd-level = 9;
            builder-grace = 120;
            max-retries = 5;
          };
        };
      }
    ];
    # Everything at its default.
    coordinator-defaults = nixos [
      {
        networking.hostName = "small";
        services.nix-farm.coordinator.enable = true;
      }
    ];
    builder1 = nixos [
      {
        networking.hostName = "builder1";
        services.openssh.enable = true;
        services.nix-farm.builder = {
          enable = true;
          coordinator = "https://${farmHost}:7070";
          caCertFile = "/etc/nix-farm/coordinator.pem";
          maxJobs = 8;
          speedFactor = 4;
          systems = [
            "x86_64-linux"
            "i686-linux"
          ];
          supportedFeatures = [
            "kvm"
            "big-parallel"
            "nixos-test"
          ];
          settings.load-interval = 10;
        };
      }
    ];
    builder2 = nixos [
      {
        networking.hostName = "builder2";
        services.nix-farm.builder = {
          enable = true;
          coordinator = "https://${farmHost}:7070";
          maxJobs = 2;
          systems = [ "aarch64-linux" ];
          supportedFeatures = [ "gpu" ];
          mandatoryFeatures = [ "gpu" ];
        };
      }
    ];
    mac = darwin [
      {
        networking.hostName = "mac";
        services.nix-farm.builder = {
          enable = true;
          coordinator = "https://${farmHost}:7070";
          maxJobs = 6;
          speedFactor = 2;
          systems = [
            "aarch64-darwin"
            "x86_64-darwin"
          ];
          supportedFeatures = [ "big-parallel" ];
        };
      }
    ];
  };

  # What each builder advertises to the coordinator: the inputs `farm machines`
  # computes the farm's line from, taken from the builders' own configurations.
  advertised = lib.mapAttrs (_: h: {
    inherit (h.config.services.nix-farm.builder)
      systems
      maxJobs
      speedFactor
      supportedFeatures
      mandatoryFeatures
      ;
  }) { inherit (hosts) builder1 builder2 mac; };

  clients = {
    # Exactly what `farm machines` prints (no client key of its own).
    client = nixos [
      {
        networking.hostName = "client";
        services.nix-farm.client = {
          enable = true;
          host = farmHost;
          hostKey = farmHostKey;
          builders = advertised;
          cache.publicKey = cachePublicKey;
        };
      }
    ];
    # The usual NixOS client: the daemon authenticates with the host key.
    client-hostkey = nixos [
      {
        networking.hostName = "client2";
        services.nix-farm.client = {
          enable = true;
          host = farmHost;
          sshKey = "/etc/ssh/ssh_host_ed25519_key";
          hostKey = farmHostKey;
          builders = advertised;
          cache.publicKey = cachePublicKey;
        };
      }
    ];
  };

  # Configurations the modules must refuse (each through its assertions).
  refused = {
    tls-cert-without-key = nixos [
      {
        services.nix-farm.coordinator = {
          enable = true;
          tls.certificateFile = "/cert.pem";
        };
      }
    ];
    # No builders declared and no systems/maxJobs either: an assertion that
    # says what to set, not a type error about maxJobs.
    client-without-builders = nixos [
      {
        services.nix-farm.client = {
          enable = true;
          host = farmHost;
          cache.publicKey = cachePublicKey;
        };
      }
    ];
    cache-without-key = nixos [
      {
        services.nix-farm.client = {
          enable = true;
          host = farmHost;
          builders = advertised;
        };
      }
    ];
    feature-missing-locally = nixos [
      {
        nix.settings.system-features = [ "kvm" ];
        services.nix-farm.builder = {
          enable = true;
          coordinator = "https://${farmHost}:7070";
          supportedFeatures = [ "big-parallel" ];
        };
      }
    ];
  };
  failedAssertions = h: map (a: a.message) (builtins.filter (a: !a.assertion) h.config.assertions);

  systemdUnits =
    h:
    lib.mapAttrs (_: u: {
      inherit (u) serviceConfig;
      path = map toString u.path;
      user = h.config.users.users.${u.serviceConfig.User} or null;
    }) (lib.filterAttrs (n: _: lib.hasPrefix "nix-farm" n) h.config.systemd.services);

  enabledFarmServices =
    h:
    lib.filterAttrs (_: c: c.enable) (
      builtins.intersectAttrs {
        coordinator = null;
        builder = null;
      } h.config.services.nix-farm
    );

  nixosSummary = h: {
    services = systemdUnits h;
    # What the generated files must hold.
    settings = lib.mapAttrs (_: c: c.settings) (enabledFarmServices h);
    keys =
      let
        c = h.config.services.nix-farm.coordinator;
        lines = k: k.keys ++ lib.concatMap (f: lib.splitString "\n" (lib.fileContents f)) k.keyFiles;
      in
      lib.optionalAttrs (enabledFarmServices h ? coordinator) {
        read_keys = lines c.readKeys;
        authorized_keys = lines c.authorizedKeys;
        push_keys = lines c.pushKeys;
        admin_keys = lines c.adminKeys;
        builder_keys = lines c.builderKeys;
      };
    nixSettings = h.config.nix.settings;
    firewall = h.config.networking.firewall.allowedTCPPorts;
    buildMachines = h.config.nix.buildMachines;
    distributedBuilds = h.config.nix.distributedBuilds;
    sshConfig = h.config.programs.ssh.extraConfig;
    knownHosts = h.config.programs.ssh.knownHosts;
    failedAssertions = failedAssertions h;
  };

  docsOf =
    h:
    builtins.filter (o: lib.hasPrefix "services.nix-farm." o.name && o.visible && !o.internal) (
      lib.optionAttrSetToDocList h.options
    );
in
{
  inherit farmHost farmHostKey advertised packageDir;
  nixos = lib.mapAttrs (_: nixosSummary) (
    builtins.removeAttrs hosts [ "mac" ] // clients
  );
  darwin.mac = {
    launchd = hosts.mac.config.launchd.daemons;
    activation = hosts.mac.config.system.activationScripts.postActivation.text;
    settings.builder = hosts.mac.config.services.nix-farm.builder.settings;
    nixSettings = hosts.mac.config.nix.settings;
    failedAssertions = failedAssertions hosts.mac;
  };
  refused = lib.mapAttrs (_: failedAssertions) refused;
  vmTest = {
    nodes = lib.mapAttrs (_: nixosSummary) vmNodes;
    advertised = lib.mapAttrs (_: h: {
      inherit (h.config.services.nix-farm.builder)
        systems
        maxJobs
        speedFactor
        supportedFeatures
        mandatoryFeatures
        ;
    }) { inherit (vmNodes) builder1 builder2; };
    clientEtc = vmNodes.client.config.environment.etc;
  };
  # nixosModules.default and darwinModules.builder from flake.nix, used as a
  # host would, with the package defaulting to the flake's.
  flakeModules = {
    nixos = nixosSummary (
      lib.evalModules {
        modules = [
          nixosStandIns
          flake.nixosModules.default
          {
            services.nix-farm.coordinator.enable = true;
            services.nix-farm.builder = {
              enable = true;
              coordinator = "https://${farmHost}:7070";
            };
          }
        ];
      }
    );
    darwin =
      (lib.evalModules {
        modules = [
          darwinStandIns
          flake.darwinModules.builder
          {
            services.nix-farm.builder = {
              enable = true;
              coordinator = "https://${farmHost}:7070";
            };
          }
        ];
      }).config.launchd.daemons.nix-farm-builder.serviceConfig.ProgramArguments;
  };
  docs = {
    nixos = docsOf (nixos [ ]);
    darwin = docsOf (darwin [ ]);
  };
}
