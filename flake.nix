{
  description = "nix-farm: a remote build farm for Nix (coordinator, builders, binary cache, CLI)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      darwinSystems = [
        "aarch64-darwin"
        "x86_64-darwin"
      ];
      forSystems = systems: f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      forAllSystems = forSystems (linuxSystems ++ darwinSystems);

      # A module from nixos-modules/, with this flake's package as the default
      # for the service it declares.
      withPackage =
        service: file:
        { lib, pkgs, ... }:
        {
          imports = [ file ];
          services.nix-farm.${service}.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
    in
    {
      packages = forAllSystems (pkgs: {
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.nix-farm;
        nix-farm = pkgs.rustPlatform.buildRustPackage {
          pname = "nix-farm";
          version = (lib.importTOML ./Cargo.toml).workspace.package.version;
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./proto
              ./coordinator
              ./builder
              ./cli
              ./tests
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [
            "--package"
            "farm-coordinator"
            "--package"
            "farm-builder"
            "--package"
            "farm-cli"
          ];
          # The tests need real Nix stores in mount namespaces and loopback
          # networking, which the build sandbox does not give: run them with
          # `cargo test --workspace` (.ci/run) and the VM test in `checks`.
          doCheck = false;
          meta = {
            description = "Remote build farm for Nix: coordinator, builder daemon and `farm` CLI";
            license = with lib.licenses; [
              mit
              asl20
            ];
            mainProgram = "farm";
            platforms = lib.platforms.linux ++ lib.platforms.darwin;
          };
        };
      });

      overlays.default = final: _prev: {
        nix-farm = self.packages.${final.stdenv.hostPlatform.system}.nix-farm;
      };

      nixosModules = {
        coordinator = withPackage "coordinator" ./nixos-modules/coordinator.nix;
        builder = withPackage "builder" ./nixos-modules/builder.nix;
        client = ./nixos-modules/client.nix;
        default = {
          imports = [
            self.nixosModules.coordinator
            self.nixosModules.builder
            self.nixosModules.client
          ];
        };
      };

      darwinModules = {
        builder = withPackage "builder" ./nixos-modules/darwin-builder.nix;
        default = self.darwinModules.builder;
      };

      checks = forSystems linuxSystems (pkgs: {
        nixos-farm = pkgs.testers.runNixOSTest (
          import ./nixos-modules/tests/farm.nix { modules = self.nixosModules; }
        );
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.nix-farm;
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            nix
            openssh
            python3
          ];
        };
      });
    };
}
