# services.nix-farm.builder: the farm's build daemon on a NixOS host, as a
# hardened systemd service that drives the host's nix-daemon.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkIf optional types;
  farmLib = import ./lib.nix { inherit lib; };
  cfg = config.services.nix-farm.builder;

  # The host's own ed25519 SSH host key: already there on every NixOS machine
  # running sshd, root-only, and its public half is easy to collect.
  sshHostKey = lib.findFirst (k: (k.type or null) == "ed25519") null config.services.openssh.hostKeys;

  shared = import ./builder-options.nix {
    inherit lib pkgs config;
    platform = {
      keyFile = if config.services.openssh.enable && sshHostKey != null then sshHostKey.path else null;
      keyFileText = lib.literalMD ''
        the host's ed25519 SSH host key (`/etc/ssh/ssh_host_ed25519_key`) when
        `services.openssh` is enabled, else `null`
      '';
      stateDir = "/var/lib/nix-farm-builder";
    };
  };

  features = lib.unique (cfg.supportedFeatures ++ cfg.mandatoryFeatures);

  commandLine = shared.commandLine {
    keyPath = {
      raw = farmLib.credentialArg "key";
    };
    nixBinDir = "${config.nix.package}/bin";
    inherit (pkgs) writeText;
  };
  execWord = a: if builtins.isAttrs a then a.raw else farmLib.escapeSystemdArg a;
in
{
  options.services.nix-farm.builder = shared.options // {
    stateDir = shared.options.stateDir // {
      type = types.strMatching "/var/lib/[^/].*";
      description = ''
        Directory of the builder's state (its generated key, scratch space).
        Managed by systemd's `StateDirectory=`, so it must be under
        {file}`/var/lib`.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.all (f: builtins.elem f config.nix.settings.system-features) features;
        message = ''
          services.nix-farm.builder advertises features (${lib.concatStringsSep ", " features}) that
          nix.settings.system-features does not include, so the local Nix would refuse those builds.
        '';
      }
    ];

    users.users.nix-farm-builder = {
      isSystemUser = true;
      group = "nix-farm-builder";
      home = cfg.stateDir;
      description = "nix-farm builder";
    };
    users.groups.nix-farm-builder = { };

    nix.settings = {
      # The builder imports the inputs it fetched from the farm cache and
      # realises derivations it did not evaluate: the daemon must trust it.
      # (Listing root keeps NixOS's default when nothing else sets this.)
      trusted-users = [
        "root"
        "nix-farm-builder"
      ];
      # Added to NixOS's default system-features; the assertion above catches
      # a configuration that sets system-features without them.
      system-features = lib.mkIf (features != [ ]) (lib.mkOptionDefault features);
    };

    systemd.services.nix-farm-builder = {
      description = "nix-farm builder";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ];
      requires = [ "nix-daemon.socket" ];
      path = [ config.nix.package ];
      serviceConfig = {
        ExecStart = lib.concatMapStringsSep " " execWord commandLine;
        User = "nix-farm-builder";
        Group = "nix-farm-builder";
        StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
        StateDirectoryMode = "0700";
        WorkingDirectory = cfg.stateDir;
        LoadCredential = optional (cfg.keyFile != null) "key:${cfg.keyFile}";
        Restart = "always";
        RestartSec = 5;
        UMask = "0077";

        CapabilityBoundingSet = [ "" ];
        AmbientCapabilities = [ "" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RemoveIPC = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
      };
    };
  };
}
