# The options of services.nix-farm.builder, shared by the NixOS module
# (builder.nix) and the nix-darwin module (darwin-builder.nix), plus the
# farm-builder command line they both run.
{
  lib,
  pkgs,
  config,
  # Platform-specific defaults: { keyFile, keyFileText, stateDir }.
  platform,
}:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkOption
    optionals
    types
    ;
  farmLib = import ./lib.nix { inherit lib; };
  cfg = config.services.nix-farm.builder;
in
{
  options = {
    enable = mkEnableOption "the nix-farm builder daemon, which joins the farm and builds what the coordinator sends with this machine's Nix";

    package = lib.mkPackageOption pkgs "nix-farm" { };

    coordinator = mkOption {
      type = types.strMatching "(https?)://.+";
      example = "https://farm.example.org:7070";
      description = ''
        URL of the coordinator's gRPC endpoint. `https://` unless the
        coordinator is on this machine's loopback.
      '';
    };

    caCertFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/nix-farm/coordinator.pem";
      description = ''
        PEM file with the coordinator's CA certificate, or its self-signed
        certificate (from the coordinator's state directory), pinned for
        `https://`. `null`: the system's trusted CAs.
      '';
    };

    name = mkOption {
      type = types.strMatching "[A-Za-z0-9._-]+";
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = "Name of this builder in the farm (`farm status`, logs).";
    };

    keyFile = mkOption {
      type = types.nullOr types.path;
      default = platform.keyFile;
      defaultText = platform.keyFileText;
      example = "/run/secrets/nix-farm-builder-key";
      description = ''
        Private ed25519 key (OpenSSH format) the builder proves its identity
        with; its public key goes in the coordinator's
        `services.nix-farm.coordinator.builderKeys`. `null`: a key is generated
        in {option}`stateDir` on first start and its public key line printed
        to the log.
      '';
    };

    stateDir = mkOption {
      type = types.str;
      default = platform.stateDir;
      description = "Directory of the builder's state (its generated key, scratch space).";
    };

    maxJobs = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 8;
      description = ''
        How many builds run at once. `null`: the local Nix's `max-jobs`, else
        the number of cores.
      '';
    };

    speedFactor = mkOption {
      type = types.ints.positive;
      default = 1;
      description = ''
        How fast this machine is relative to the farm's other builders; the
        scheduler prefers faster ones.
      '';
    };

    systems = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "x86_64-linux"
        "i686-linux"
      ];
      description = ''
        Systems this builder builds for. Empty: the local Nix's `system` and
        `extra-platforms`.
      '';
    };

    supportedFeatures = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "kvm"
        "big-parallel"
        "nixos-test"
      ];
      description = ''
        System features this builder offers. Empty: the local Nix's
        `system-features`. Listed features are also added to the local Nix's
        `system-features`, so the builds that require them can run here.
      '';
    };

    mandatoryFeatures = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "big-parallel" ];
      description = ''
        Features a derivation must require to be built here (keep a big
        machine for big builds).
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = farmLib.toml.type; };
      default = { };
      example = {
        load-interval = 10;
      };
      description = ''
        Further settings, written to a TOML file passed with `--config`. Keys
        are the builder's long flag names (`farm-builder --help`); unknown keys
        are refused when the builder starts. Settings that have their own
        option above are passed as flags, which take precedence.
      '';
    };
  };

  # The farm-builder argument vector: unquoted strings, except that `keyPath`
  # may be `{ raw = "…"; }`, a word the service manager expands itself (a
  # systemd credential path).
  commandLine =
    {
      keyPath,
      nixBinDir,
      writeText,
    }:
    let
      flag = name: value: [
        name
        (if builtins.isAttrs value && value ? raw then value else toString value)
      ];
      settingsFile =
        if cfg.settings == { } then null else farmLib.toml.generate writeText "nix-farm-builder.toml" cfg.settings;
    in
    [ "${cfg.package}/bin/farm-builder" ]
    ++ flag "--coordinator" cfg.coordinator
    ++ flag "--state-dir" cfg.stateDir
    ++ flag "--name" cfg.name
    ++ optionals (cfg.keyFile != null) (flag "--key" keyPath)
    ++ optionals (cfg.caCertFile != null) (flag "--ca-cert" cfg.caCertFile)
    ++ optionals (cfg.maxJobs != null) (flag "--max-jobs" cfg.maxJobs)
    ++ flag "--speed-factor" cfg.speedFactor
    ++ farmLib.repeatFlag "--system" cfg.systems
    ++ farmLib.repeatFlag "--feature" cfg.supportedFeatures
    ++ farmLib.repeatFlag "--mandatory-feature" cfg.mandatoryFeatures
    ++ flag "--nix-bin-dir" nixBinDir
    ++ optionals (settingsFile != null) (flag "--config" settingsFile);
}
