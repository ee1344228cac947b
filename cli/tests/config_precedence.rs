//! The real `farm` binary resolves its settings flag > environment > config
//! file > default (checked through `farm config`, which contacts nothing), and
//! maps usage errors to exit status 2.

use std::process::Command;

fn farm(home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_farm"));
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

#[test]
fn flag_over_env_over_file_over_default() {
    let home = tempfile::tempdir().unwrap();
    let conf = home.path().join(".config/nix-farm");
    std::fs::create_dir_all(&conf).unwrap();

    // default
    let out = farm(home.path()).arg("config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        line(&text, "coordinator").contains("http://127.0.0.1:7070  (default)"),
        "{text}"
    );

    // file
    std::fs::write(
        conf.join("config.toml"),
        "coordinator = \"http://127.0.0.1:1111\"\nkey = \"~/from-file\"\n",
    )
    .unwrap();
    let text = String::from_utf8(farm(home.path()).arg("config").output().unwrap().stdout).unwrap();
    assert!(
        line(&text, "coordinator").contains("http://127.0.0.1:1111  (config file)"),
        "{text}"
    );
    assert!(
        line(&text, "key").contains(&format!("{}/from-file", home.path().display())),
        "{text}"
    );

    // environment over file
    let text = String::from_utf8(
        farm(home.path())
            .arg("config")
            .env("FARM_COORDINATOR", "http://127.0.0.1:2222")
            .env("FARM_KEY", "/env/key")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        line(&text, "coordinator").contains("http://127.0.0.1:2222"),
        "{text}"
    );
    assert!(line(&text, "key").contains("/env/key"), "{text}");

    // flag over environment
    let text = String::from_utf8(
        farm(home.path())
            .args(["config", "--coordinator", "127.0.0.1:3333"])
            .env("FARM_COORDINATOR", "http://127.0.0.1:2222")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        line(&text, "coordinator").contains("http://127.0.0.1:3333"),
        "{text}"
    );
}

#[test]
fn usage_errors_exit_2_and_unreachable_exits_3() {
    let home = tempfile::tempdir().unwrap();
    let out = farm(home.path())
        .args(["status", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = farm(home.path()).args(["build"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // a broken config file is a usage error too
    let conf = home.path().join(".config/nix-farm");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("config.toml"), "coordinater = \"x\"\n").unwrap();
    let out = farm(home.path()).args(["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_file(conf.join("config.toml")).unwrap();

    // nothing listens on this port: exit 3 with a hint
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = farm(home.path())
        .args([
            "status",
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the coordinator"), "{err}");
    assert!(err.contains("FARM_COORDINATOR"), "{err}");
}

#[test]
fn completions_and_help() {
    let home = tempfile::tempdir().unwrap();
    let out = farm(home.path())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("farm"));
    let out = farm(home.path())
        .args(["build", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("\"derivations\""), "{help}");
    assert!(help.contains("Exit status"), "{help}");
}
