# services.nix-farm.coordinator: the farm's coordinator (scheduler, binary
# cache, gRPC endpoint for builders and the CLI, SSH endpoint for Nix) as a
# hardened systemd service.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    optional
    optionals
    types
    ;
  farmLib = import ./lib.nix { inherit lib; };
  cfg = config.services.nix-farm.coordinator;

  # `[::]` and `0.0.0.0` take a port after a colon, like every other address.
  listenOption = name: defaultPort: {
    listenAddress = mkOption {
      type = types.str;
      default = "[::]";
      example = "127.0.0.1";
      description = ''
        Address the ${name} listener binds to. IPv6 addresses go in brackets
        (`[::1]`); `[::]` listens on every IPv4 and IPv6 address.
      '';
    };
    port = mkOption {
      type = types.port;
      default = defaultPort;
      description = "TCP port of the ${name} listener (0 picks a free one).";
    };
  };

  keysOption = what: {
    keys = mkOption {
      type = types.listOf types.singleLineStr;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOeVY5wR0QX0cJZ3uvC5vPqLzq4hMxp1nXK6S8oS9W3P alice@laptop" ];
      description = ''
        ${what}, as OpenSSH public key lines (`authorized_keys` format).
      '';
    };
    keyFiles = mkOption {
      type = types.listOf types.path;
      default = [ ];
      description = ''
        Files in `authorized_keys` format whose keys are added to
        {option}`keys`. They are read when the configuration is evaluated,
        like `users.users.<name>.openssh.authorizedKeys.keyFiles`.
      '';
    };
  };

  keysFile =
    name: k:
    let
      lines = k.keys ++ map builtins.readFile k.keyFiles;
    in
    if lines == [ ] then null else pkgs.writeText name (lib.concatMapStrings (l: lib.removeSuffix "\n" l + "\n") lines);

  settingsFile =
    if cfg.settings == { } then null else farmLib.toml.generate pkgs.writeText "nix-farm-coordinator.toml" cfg.settings;

  address = l: "${l.listenAddress}:${toString l.port}";

  arg = farmLib.escapeSystemdArg;
  flag = name: value: [
    (arg name)
    (arg value)
  ];
  fileFlag = name: file: optionals (file != null) (flag name file);
  credentialFlag = name: credential: file: optionals (file != null) [
    (arg name)
    (farmLib.credentialArg credential)
  ];

  commandLine =
    [ (arg "${cfg.package}/bin/farm-coordinator") ]
    ++ flag "--state-dir" cfg.stateDir
    ++ flag "--grpc" (address cfg.grpc)
    ++ flag "--http" (address cfg.http)
    ++ flag "--ssh" (address cfg.ssh)
    ++ flag "--ssh-login-grace" (toString cfg.ssh.loginGraceTime)
    ++ flag "--ssh-max-connections" (toString cfg.ssh.maxConnections)
    ++ flag "--ssh-max-sessions-per-key" (toString cfg.ssh.maxSessionsPerKey)
    ++ optionals (cfg.publicHost != null) (flag "--public-host" cfg.publicHost)
    ++ flag "--cache-key-name" cfg.cacheKeyName
    ++ credentialFlag "--cache-key-file" "cache-key" cfg.cacheKeyFile
    ++ fileFlag "--read-keys" (keysFile "read_keys" cfg.readKeys)
    ++ fileFlag "--authorized-keys" (keysFile "authorized_keys" cfg.authorizedKeys)
    ++ fileFlag "--push-keys" (keysFile "push_keys" cfg.pushKeys)
    ++ fileFlag "--admin-keys" (keysFile "admin_keys" cfg.adminKeys)
    ++ fileFlag "--builder-keys" (keysFile "builder_keys" cfg.builderKeys)
    ++ flag "--tls" cfg.tls.mode
    ++ fileFlag "--tls-cert" cfg.tls.certificateFile
    ++ credentialFlag "--tls-key" "tls-key" cfg.tls.keyFile
    ++ optionals (cfg.alerts.ntfyUrl != null) (flag "--alert-ntfy" cfg.alerts.ntfyUrl)
    ++ credentialFlag "--alert-ntfy-file" "alert-ntfy" cfg.alerts.ntfyUrlFile
    ++ optionals (cfg.alerts.webhookUrl != null) (flag "--alert-webhook" cfg.alerts.webhookUrl)
    ++ credentialFlag "--alert-webhook-file" "alert-webhook" cfg.alerts.webhookUrlFile
    ++ flag "--alert-builder-offline" (toString cfg.alerts.builderOfflineSeconds)
    ++ flag "--alert-disk-free" (toString cfg.alerts.diskFreeBytes)
    ++ flag "--alert-memory-available" (toString cfg.alerts.memoryAvailableBytes)
    ++ flag "--alert-load-hold" (toString cfg.alerts.loadHoldSeconds)
    ++ optionals (cfg.alerts.jobs != [ ]) (flag "--alert-jobs" (lib.concatStringsSep "," cfg.alerts.jobs))
    ++ flag "--alert-cache-bytes" (toString cfg.alerts.cacheMaxBytes)
    ++ flag "--alert-flush-slow-ms" (toString cfg.alerts.flushSlowMs)
    ++ flag "--alert-flush-window" (toString cfg.alerts.flushWindowSeconds)
    ++ fileFlag "--config" settingsFile;

  privilegedPort = builtins.any (l: l.port != 0 && l.port < 1024) [
    cfg.grpc
    cfg.http
    cfg.ssh
  ];
in
{
  options.services.nix-farm.coordinator = {
    enable = mkEnableOption "the nix-farm coordinator: scheduler, binary cache and the endpoints Nix, builders and the `farm` CLI connect to";

    package = lib.mkPackageOption pkgs "nix-farm" { };

    grpc = listenOption "gRPC (builders and the `farm` CLI)" 7070;
    http = listenOption "HTTP (binary cache, `/metrics`, dashboard)" 7080;
    ssh = listenOption "SSH (Nix's `ssh-ng://` and `ssh://` remote store endpoint)" 7022 // {
      loginGraceTime = mkOption {
        type = types.ints.positive;
        default = 30;
        description = ''
          Seconds an SSH client has from connecting to authenticating with its
          key; then it is disconnected. Nix clients need well under a second.
        '';
      };
      maxConnections = mkOption {
        type = types.ints.positive;
        default = 512;
        description = ''
          Open SSH connections at most, authenticated or not; past it a new
          connection is told so and closed.
        '';
      };
      maxSessionsPerKey = mkOption {
        type = types.ints.positive;
        default = 64;
        description = ''
          Nix sessions (remote builds, copies) one client key runs at once;
          more are refused with a message.
        '';
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open the gRPC, HTTP and SSH ports in the firewall.";
    };

    publicHost = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "farm.example.org";
      description = ''
        Host name clients and builders reach the coordinator by, used in what
        it prints (`farm machines`, the TLS certificate it generates). `null`
        means the listen address's host when it is a specific one, else the
        machine's host name.
      '';
    };

    stateDir = mkOption {
      type = types.strMatching "/var/lib/[^/].*";
      default = "/var/lib/nix-farm-coordinator";
      description = ''
        Directory of the coordinator's state: its database, the local binary
        cache, generated keys and certificate, `endpoints.json`. Managed by
        systemd's `StateDirectory=`, so it must be under {file}`/var/lib`; it is
        the one directory to persist on an impermanent root.
      '';
    };

    cacheKeyName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      example = "farm.example.org-1";
      description = ''
        Name of the cache signing key the coordinator generates on first start
        (the part before the colon of its public key). Unused when
        {option}`cacheKeyFile` is set.
      '';
    };

    cacheKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/nix-farm-cache-key";
      description = ''
        Secret key signing the binary cache (Nix format `name:base64`, as
        written by `nix-store --generate-binary-cache-key`). Passed to the
        service as a systemd credential, so a root-only file (sops-nix, agenix)
        works. `null`: a key is generated in {option}`stateDir` on first start.
        Do not use a Nix path literal here: it would be copied to the world-readable
        store.
      '';
    };

    readKeys = keysOption ''
      Clients that may only read: `farm status`, logs, cache queries and
      downloads over SSH'';
    authorizedKeys = keysOption ''
      Clients that may build: Nix clients (through the SSH endpoint, as
      `nix.buildMachines` or `--store ssh-ng://`) and `farm build`. What they
      upload stays their own unsigned claim: usable in their builds, never
      signed or served to others. With no key in any of the key options, no
      client can connect'';
    pushKeys = keysOption ''
      Clients the farm trusts like Nix's `trusted-users`: their uploads, and
      the outputs of their build-hook builds, are signed into the farm's
      cache. Give one to each host whose hook builds should fill the cache'';
    adminKeys = keysOption ''
      Operators: everything {option}`pushKeys` may, and drain builders and
      cancel builds'';
    builderKeys = keysOption ''
      Builders' public keys: only these builders may join (each builder prints
      its key line on first start)'';

    tls = {
      mode = mkOption {
        type = types.enum [
          "auto"
          "on"
          "off"
        ];
        default = "auto";
        description = ''
          Whether gRPC runs over TLS. `auto`: TLS unless the gRPC listener is
          on loopback. `off` beyond loopback is refused by the coordinator
          unless `insecure-plaintext = true` is in {option}`settings`.
        '';
      };
      certificateFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/var/lib/acme/farm.example.org/fullchain.pem";
        description = ''
          TLS certificate chain (PEM) for the gRPC listener. `null`: a
          self-signed certificate is generated in {option}`stateDir`; builders
          then pin it (`services.nix-farm.builder.caCertFile`).
        '';
      };
      keyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/var/lib/acme/farm.example.org/key.pem";
        description = ''
          Private key (PEM) of {option}`tls.certificateFile`, passed as a
          systemd credential.
        '';
      };
    };

    alerts = {
      ntfyUrl = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://ntfy.sh/my-farm-alerts";
        description = ''
          ntfy topic URL alerts are published to (message body, with Title,
          Priority and Tags headers). It lands in the world-readable Nix
          store: a topic that is its own secret belongs in
          {option}`alerts.ntfyUrlFile`. With neither target set, no alerts
          are evaluated.
        '';
      };
      ntfyUrlFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/nix-farm-ntfy-url";
        description = ''
          File whose first line is the ntfy topic URL, passed as a systemd
          credential (sops-nix, agenix). Not a Nix path literal: it would be
          copied to the store.
        '';
      };
      webhookUrl = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://hooks.example.org/farm";
        description = ''
          URL each alert is POSTed to as JSON: `{"alert", "state":
          "firing"|"resolved", "subject", "message", "title", "at"}`. A URL
          carrying a token belongs in {option}`alerts.webhookUrlFile`.
        '';
      };
      webhookUrlFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/nix-farm-webhook-url";
        description = "File whose first line is the webhook URL, passed as a systemd credential.";
      };
      builderOfflineSeconds = mkOption {
        type = types.ints.positive;
        default = 300;
        description = "A builder (not drained) offline this many seconds alerts.";
      };
      diskFreeBytes = mkOption {
        type = types.ints.unsigned;
        default = 5368709120;
        description = "A connected builder reporting less free disk in its Nix store alerts; 0: never.";
      };
      memoryAvailableBytes = mkOption {
        type = types.ints.unsigned;
        default = 1073741824;
        description = "A connected builder reporting less available memory alerts; 0: never.";
      };
      loadHoldSeconds = mkOption {
        type = types.ints.unsigned;
        default = 120;
        description = "How long low disk or memory must last before it alerts, and be over before it recovers.";
      };
      jobs = mkOption {
        type = types.listOf (types.strMatching "[A-Za-z0-9._/+-]+");
        default = [ ];
        example = [ "ci/app" ];
        description = ''
          Named jobs (`farm build --job NAME`) to watch: one alert when one
          goes from passing to failing, one when it passes again.
        '';
      };
      cacheMaxBytes = mkOption {
        type = types.ints.unsigned;
        default = 0;
        description = "The binary cache storing more than this many (compressed) bytes alerts; 0: never.";
      };
      flushSlowMs = mkOption {
        type = types.ints.unsigned;
        default = 1000;
        description = ''
          State database flushes taking longer than this many milliseconds on
          average over {option}`alerts.flushWindowSeconds` alert; 0: never.
        '';
      };
      flushWindowSeconds = mkOption {
        type = types.ints.positive;
        default = 60;
        description = "The window the flush average is taken over.";
      };
    };

    settings = mkOption {
      type = types.submodule { freeformType = farmLib.toml.type; };
      default = { };
      example = literalExpression ''
        {
          zstd-level = 9;
          builder-grace = 120;
          cache.storage = { type = "s3"; bucket = "nix-farm"; region = "garage"; endpoint = "https://s3.example.org"; };
        }
      '';
      description = ''
        Further settings, written to a TOML file passed with `--config`. Keys
        are the coordinator's long flag names (`farm-coordinator --help`);
        unknown keys are refused when the coordinator starts. Settings that
        have their own option above are passed as flags, which take
        precedence.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.tls.certificateFile == null) == (cfg.tls.keyFile == null);
        message = "services.nix-farm.coordinator: set both tls.certificateFile and tls.keyFile, or neither.";
      }
      {
        assertion = cfg.alerts.ntfyUrl == null || cfg.alerts.ntfyUrlFile == null;
        message = "services.nix-farm.coordinator: set alerts.ntfyUrl or alerts.ntfyUrlFile, not both.";
      }
      {
        assertion = cfg.alerts.webhookUrl == null || cfg.alerts.webhookUrlFile == null;
        message = "services.nix-farm.coordinator: set alerts.webhookUrl or alerts.webhookUrlFile, not both.";
      }
    ];

    users.users.nix-farm-coordinator = {
      isSystemUser = true;
      group = "nix-farm-coordinator";
      home = cfg.stateDir;
      description = "nix-farm coordinator";
    };
    users.groups.nix-farm-coordinator = { };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
      builtins.filter (p: p != 0) [
        cfg.grpc.port
        cfg.http.port
        cfg.ssh.port
      ]
    );

    systemd.services.nix-farm-coordinator = {
      description = "nix-farm coordinator";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      serviceConfig = {
        ExecStart = lib.concatStringsSep " " commandLine;
        User = "nix-farm-coordinator";
        Group = "nix-farm-coordinator";
        StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
        StateDirectoryMode = "0700";
        WorkingDirectory = cfg.stateDir;
        LoadCredential =
          optional (cfg.cacheKeyFile != null) "cache-key:${cfg.cacheKeyFile}"
          ++ optional (cfg.tls.keyFile != null) "tls-key:${cfg.tls.keyFile}"
          ++ optional (cfg.alerts.ntfyUrlFile != null) "alert-ntfy:${cfg.alerts.ntfyUrlFile}"
          ++ optional (cfg.alerts.webhookUrlFile != null) "alert-webhook:${cfg.alerts.webhookUrlFile}";
        Restart = "on-failure";
        RestartSec = 5;
        UMask = "0077";

        AmbientCapabilities = if privilegedPort then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        CapabilityBoundingSet = if privilegedPort then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateUsers = !privilegedPort;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
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
