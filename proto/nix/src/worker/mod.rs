//! The worker protocol (`nix-daemon --stdio`, what `ssh-ng://` store URIs speak).
