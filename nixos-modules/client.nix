# services.nix-farm.client: make this host build on the farm and substitute
# from its cache. To Nix the whole farm is one remote builder (one entry in
# nix.buildMachines) reached through the coordinator's SSH endpoint.
{ config, lib, options, ... }:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  farmLib = import ./lib.nix { inherit lib; };
  cfg = config.services.nix-farm.client;
  farm = farmLib.farmMachine cfg.builders;
  opt = options.services.nix-farm.client;
  # Set by the user rather than computed from `builders` (option defaults have
  # priority 1500).
  userSet = o: o.highestPrio < 1500;
  noBuilders = ''
    services.nix-farm.client.builders is empty, so the farm's machine entry has
    no systems and no jobs: declare the farm's builders as they advertise
    themselves (`farm status --json` lists them), e.g.
      services.nix-farm.client.builders.big = { systems = [ "x86_64-linux" ]; maxJobs = 8; };
    or set services.nix-farm.client.systems and .maxJobs yourself (`farm machines` prints them).'';
  fromBuilders = v: if cfg.builders == { } then throw noBuilders else v;

  builderType = types.submodule {
    options = {
      systems = mkOption {
        type = types.nonEmptyListOf types.str;
        example = [ "aarch64-linux" ];
        description = "Systems the builder builds for (its `services.nix-farm.builder.systems`).";
      };
      maxJobs = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "Builds the builder runs at once.";
      };
      speedFactor = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "The builder's speed factor.";
      };
      supportedFeatures = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "System features the builder offers.";
      };
      mandatoryFeatures = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Features a derivation must require to be built on the builder.";
      };
    };
  };
in
{
  options.services.nix-farm.client = {
    enable = mkEnableOption "building on the nix-farm (as one remote builder in `nix.buildMachines`) and using its binary cache";

    host = mkOption {
      type = types.strMatching "[^ /@:]+";
      example = "farm.example.org";
      description = ''
        Host name of the coordinator (its `services.nix-farm.coordinator.publicHost`).
        SSH connections to this name go to {option}`sshPort` and check
        {option}`hostKey` (a `Host` block in the system SSH configuration), so
        use a name dedicated to the farm, not the one you log in to the
        machine with on port 22.
      '';
    };

    sshPort = mkOption {
      type = types.port;
      default = 7022;
      description = "Port of the coordinator's SSH endpoint (`services.nix-farm.coordinator.ssh.port`).";
    };

    protocol = mkOption {
      type = types.enum [
        "ssh-ng"
        "ssh"
      ];
      default = "ssh-ng";
      description = "Protocol Nix speaks to the farm: `ssh-ng` (worker protocol) or `ssh` (`nix-store --serve`).";
    };

    sshUser = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "nix";
      description = ''
        User name to connect as; the coordinator authenticates by key only.
        `null`: SSH's default (`root`, for the nix-daemon).
      '';
    };

    sshKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/ssh/ssh_host_ed25519_key";
      description = ''
        Private key the nix-daemon (root) authenticates to the farm with; its
        public key goes in `services.nix-farm.coordinator.authorizedKeys`.
        `null`: root's default SSH identities. A path string, so a secret
        managed by sops-nix or agenix works.
      '';
    };

    hostKey = mkOption {
      type = types.nullOr types.singleLineStr;
      default = null;
      example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOeVY5wR0QX0cJZ3uvC5vPqLzq4hMxp1nXK6S8oS9W3P";
      description = ''
        The coordinator's SSH host key line (`ssh_host_key` in its
        `endpoints.json`, or `farm machines`). Added to the system's known
        hosts and to the `nix.buildMachines` entry. `null`: SSH checks its
        usual known-hosts files.
      '';
    };

    builders = mkOption {
      type = types.attrsOf builderType;
      default = { };
      example = literalExpression ''
        {
          big = { systems = [ "x86_64-linux" ]; maxJobs = 16; speedFactor = 4; supportedFeatures = [ "kvm" "big-parallel" ]; };
          pi = { systems = [ "aarch64-linux" ]; maxJobs = 4; };
          mac = { systems = [ "aarch64-darwin" ]; maxJobs = 8; };
        }
      '';
      description = ''
        The farm's builders, as they advertise themselves to the coordinator.
        The farm's single `nix.buildMachines` entry is computed from them the
        way `farm machines` computes it: every system and feature of any
        builder, the sum of their jobs, the best speed factor, and the
        features every builder requires.
      '';
    };

    systems = mkOption {
      type = types.nonEmptyListOf types.str;
      default = fromBuilders farm.systems;
      defaultText = literalExpression "every system of some builder in `builders`";
      example = [
        "x86_64-linux"
        "aarch64-linux"
        "aarch64-darwin"
      ];
      description = "Systems Nix may send to the farm.";
    };

    maxJobs = mkOption {
      type = types.ints.positive;
      default = fromBuilders farm.maxJobs;
      defaultText = literalExpression "the sum of the `maxJobs` of `builders`";
      description = "Builds Nix sends to the farm at once.";
    };

    speedFactor = mkOption {
      type = types.ints.positive;
      default = farm.speedFactor;
      defaultText = literalExpression "the highest `speedFactor` of `builders`";
      description = "The farm's speed factor, relative to other entries in `nix.buildMachines`.";
    };

    supportedFeatures = mkOption {
      type = types.listOf types.str;
      default = farm.supportedFeatures;
      defaultText = literalExpression "every feature some builder in `builders` supports or requires, less `mandatoryFeatures`";
      description = "System features the farm offers.";
    };

    mandatoryFeatures = mkOption {
      type = types.listOf types.str;
      default = farm.mandatoryFeatures;
      defaultText = literalExpression "the features every builder in `builders` requires";
      description = "Features a derivation must require to be sent to the farm.";
    };

    buildersUseSubstitutes = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Set Nix's `builders-use-substitutes`: the farm fetches inputs it lacks
        from its own substituters instead of receiving them from this host.
      '';
    };

    cache = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Whether to use the farm's binary cache as a substituter.";
      };
      url = mkOption {
        type = types.str;
        default = "http://${cfg.host}:7080";
        defaultText = literalExpression ''"http://''${config.services.nix-farm.client.host}:7080"'';
        example = "https://cache.farm.example.org";
        description = "URL of the farm's binary cache (the coordinator's HTTP endpoint).";
      };
      publicKey = mkOption {
        type = types.nullOr (types.strMatching "[^:]+:[A-Za-z0-9+/]+={0,2}");
        default = null;
        example = "farm.example.org-1:3pCa8cSpr4RWYfJNaB5vnCdzC4I8TtDUT2VwmjbRqpk=";
        description = ''
          Public key the farm signs its cache with (`cache_public_key` in the
          coordinator's `endpoints.json`). Required when {option}`cache.enable` is set.
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.builders != { } || (userSet opt.systems && userSet opt.maxJobs);
        message = noBuilders;
      }
      {
        assertion = !cfg.cache.enable || cfg.cache.publicKey != null;
        message = "services.nix-farm.client.cache.publicKey must be set when cache.enable is (Nix only trusts signed paths).";
      }
    ];

    nix.distributedBuilds = true;
    nix.buildMachines = [
      {
        hostName = cfg.host;
        inherit (cfg)
          protocol
          sshUser
          sshKey
          systems
          maxJobs
          speedFactor
          supportedFeatures
          mandatoryFeatures
          ;
        publicHostKey = if cfg.hostKey == null then null else farmLib.toBase64 cfg.hostKey;
      }
    ];

    nix.settings = lib.mkMerge [
      { builders-use-substitutes = cfg.buildersUseSubstitutes; }
      (mkIf cfg.cache.enable {
        substituters = [ cfg.cache.url ];
        trusted-public-keys = [ cfg.cache.publicKey ];
      })
    ];

    # Nix runs plain `ssh HOST`: the port comes from here. HostKeyAlias makes
    # the known-hosts lookup use the bare name, which is what Nix writes for
    # publicHostKey and what programs.ssh.knownHosts lists below.
    programs.ssh.extraConfig = ''
      Host ${cfg.host}
        Port ${toString cfg.sshPort}
        HostKeyAlias ${cfg.host}
    '';
    programs.ssh.knownHosts = mkIf (cfg.hostKey != null) {
      "nix-farm-${cfg.host}" = {
        hostNames = [ cfg.host ];
        publicKey = cfg.hostKey;
      };
    };
  };
}
