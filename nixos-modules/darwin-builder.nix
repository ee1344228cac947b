# services.nix-farm.builder for nix-darwin: the farm's build daemon on a Mac
# (aarch64-darwin), as a launchd daemon driving the machine's Nix.
#
# It runs as root, like nix-darwin's own nix-daemon: on macOS there is no
# systemd sandboxing to confine it with, and root is already trusted by Nix.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkIf;
  cfg = config.services.nix-farm.builder;

  shared = import ./builder-options.nix {
    inherit lib pkgs config;
    platform = {
      keyFile = null;
      keyFileText = lib.literalMD "`null` (a key generated in {option}`stateDir`)";
      stateDir = "/var/lib/nix-farm-builder";
    };
  };

  features = lib.unique (cfg.supportedFeatures ++ cfg.mandatoryFeatures);
  logFile = "/var/log/nix-farm-builder.log";
in
{
  options.services.nix-farm.builder = shared.options // {
    stateDir = shared.options.stateDir // {
      type = lib.types.strMatching "/.+";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.all (f: builtins.elem f (config.nix.settings.system-features or [ ])) features;
        message = ''
          services.nix-farm.builder advertises features (${lib.concatStringsSep ", " features}) that
          nix.settings.system-features does not include, so the local Nix would refuse those builds.
        '';
      }
    ];

    # Added to the default system-features (see the NixOS module).
    nix.settings.system-features = lib.mkIf (features != [ ]) (lib.mkOptionDefault features);

    system.activationScripts.postActivation.text = ''
      mkdir -p ${lib.escapeShellArg cfg.stateDir}
      chmod 0700 ${lib.escapeShellArg cfg.stateDir}
    '';

    launchd.daemons.nix-farm-builder = {
      serviceConfig = {
        Label = "org.nix-farm.builder";
        ProgramArguments = shared.commandLine {
          keyPath = cfg.keyFile;
          nixBinDir = "${config.nix.package}/bin";
          inherit (pkgs) writeText;
        };
        EnvironmentVariables = {
          PATH = "${config.nix.package}/bin:/usr/bin:/bin:/usr/sbin:/sbin";
          NIX_REMOTE = "daemon";
        };
        WorkingDirectory = cfg.stateDir;
        RunAtLoad = true;
        KeepAlive = true;
        ThrottleInterval = 5;
        ProcessType = "Adaptive";
        StandardOutPath = logFile;
        StandardErrorPath = logFile;
        Umask = 63; # 0077
      };
    };
  };
}
