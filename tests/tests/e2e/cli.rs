//! The command line as an operator meets it: version, configuration, data directory.

use crate::support::{Device, outpost_bin};
use outpost_engine::testing::GgufBuilder;

#[test]
fn version_names_the_release_and_the_commit() {
    let out = std::process::Command::new(outpost_bin())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let re_ok = text.starts_with(&format!("outpost {} (", env!("CARGO_PKG_VERSION")))
        && text.trim_end().ends_with(')');
    assert!(re_ok, "{text:?}");
    let commit = text
        .trim_end()
        .rsplit('(')
        .next()
        .unwrap()
        .trim_end_matches(')');
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{commit:?}"
    );
}

#[test]
fn config_check_accepts_a_valid_config() {
    let d = Device::new();
    std::fs::write(
        &d.config,
        "[device]\nid = \"edge-1\"\ngroups = [\"lab\"]\n[engine]\nthreads = 2\nmemory_budget = \"1GiB\"\n",
    )
    .unwrap();
    let out = d.run(&["config", "check"]);
    assert!(
        out.ok().contains("Configuration OK (device id: edge-1"),
        "{out:?}"
    );
    let v = d.run(&["config", "check", "--json"]).json();
    assert_eq!(v["config"]["device"]["groups"][0], "lab");
    assert_eq!(v["config"]["engine"]["memory_budget"], 1u64 << 30);
}

#[test]
fn config_errors_exit_78_naming_the_key_and_the_file() {
    let d = Device::new();
    std::fs::write(&d.config, "[device]\nid = \"edge-1\"\ncolour = \"blue\"\n").unwrap();
    let out = d.run(&["config", "check"]);
    out.fails(78, "key `device.colour`: unknown field `colour`");
    assert!(
        out.stderr.contains(&d.config.display().to_string()),
        "{out:?}"
    );

    // A drop-in that sets a bad id is named, not the main file.
    std::fs::write(&d.config, "[device]\nid = \"edge-1\"\n").unwrap();
    let dropins = d.config.parent().unwrap().join("config.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::write(
        dropins.join("90-bad.toml"),
        "[device]\nid = \"edge 1/../x\"\n",
    )
    .unwrap();
    let out = d.run(&["config", "check"]);
    out.fails(
        78,
        "90-bad.toml: key `device.id`: 'edge 1/../x' is not a valid device id",
    );

    // Every command validates the config first, with the same exit code.
    d.run(&["models", "list"]).fails(78, "90-bad.toml");

    // A --config that does not exist is an error, not silently the defaults.
    let out = std::process::Command::new(crate::support::outpost_bin())
        .args(["--config", "/nonexistent/outpost.toml", "config", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/outpost.toml: cannot read")
    );
}

#[test]
fn data_dir_comes_from_flag_then_env_then_config() {
    let d = Device::new();
    let from_config = d.root.path().join("from-config");
    let from_env = d.root.path().join("from-env");
    std::fs::write(
        &d.config,
        format!("[device]\ndata_dir = \"{}\"\n", from_config.display()),
    )
    .unwrap();
    let model = d.file("m.gguf", &GgufBuilder::llama_like().build());
    let import = |cmd: &mut std::process::Command| {
        let out = cmd
            .args(["models", "import", model.to_str().unwrap(), "--name", "m"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let bin = outpost_bin();
    let base = || {
        let mut c = std::process::Command::new(&bin);
        c.env_remove("OUTPOST_DATA_DIR")
            .arg("--config")
            .arg(&d.config);
        c
    };
    import(&mut base());
    assert!(from_config.join("registry.db").is_file());
    import(base().env("OUTPOST_DATA_DIR", &from_env));
    assert!(from_env.join("registry.db").is_file());
    import(
        base()
            .env("OUTPOST_DATA_DIR", &from_env)
            .arg("--data-dir")
            .arg(&d.data),
    );
    assert!(d.data.join("registry.db").is_file());
}

#[test]
fn usage_errors_exit_2() {
    let d = Device::new();
    let out = d.run(&["models", "import"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--name"), "{out:?}");
}

/// A packaged device's data directory belongs to the service's user (`outpost`). Root acting
/// there would leave files (a database's `-wal`, a blob, the device key) that the service
/// cannot open: the command is refused, names the way (`sudo -u <owner>`), and writes nothing.
#[test]
fn root_is_refused_a_data_directory_another_user_owns() {
    use std::os::unix::fs::{MetadataExt, chown};
    let d = Device::new();
    std::fs::create_dir_all(&d.data).unwrap();
    if std::fs::metadata(&d.data).unwrap().uid() != 0 {
        crate::support::skip::<()>("changing a folder's owner needs root");
        return;
    }
    let model = d.file("m.gguf", &GgufBuilder::llama_like().build());
    chown(&d.data, Some(65534), Some(65534)).unwrap();
    d.import(&model, "m", &[]).fails(1, "belongs to user");
    let refused = d.run(&["keys", "device"]);
    refused.fails(1, "sudo -u ");
    assert!(refused.stderr.contains("outpost ..."), "{refused:?}");
    assert_eq!(
        std::fs::read_dir(&d.data).unwrap().count(),
        0,
        "the refused commands wrote into the data directory"
    );
    // What does not touch the data directory still runs.
    assert!(
        d.run(&["config", "check"])
            .ok()
            .contains("Configuration OK")
    );

    chown(&d.data, Some(0), Some(0)).unwrap();
    d.import(&model, "m", &[]).ok();
    assert!(d.data.join("registry.db").is_file());
}
