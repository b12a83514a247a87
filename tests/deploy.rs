//! The deployment files: the systemd units in deploy/systemd pass `systemd-analyze
//! verify` (with the binary and environment file where a host would have them), and the
//! flags their examples show are flags the commands take.

use std::path::Path;
use std::process::Command;

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd");

/// Unit `name`'s text, pointed at this build's binary and an environment file in `dir`.
fn unit_for_this_host(name: &str, dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(Path::new(UNITS).join(name)).unwrap();
    assert!(text.contains("/usr/local/bin/picocenter"), "{name}");
    assert!(text.contains("EnvironmentFile=/etc/picocenter/"), "{name}");
    let env = dir.join("picocenter.env");
    std::fs::write(&env, "PICOCENTER_TOKEN=t\n").unwrap();
    let text = text
        .replace(
            "/usr/local/bin/picocenter",
            env!("CARGO_BIN_EXE_picocenter"),
        )
        .replace(
            &format!(
                "/etc/picocenter/{}.env",
                name.trim_start_matches("picocenter-")
                    .trim_end_matches(".service")
            ),
            env.to_str().unwrap(),
        );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_systemd_units_verify() {
    for name in ["picocenter-hub.service", "picocenter-worker.service"] {
        let dir = tempfile::tempdir().unwrap();
        let unit = unit_for_this_host(name, dir.path());
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("systemd-analyze (scripts/setup.sh installs systemd)");
        let said = String::from_utf8_lossy(&out.stderr);
        // Nothing about this unit: a host without systemd running may complain about
        // others it looks at.
        let about_it: Vec<&str> = said.lines().filter(|l| l.contains(name)).collect();
        assert!(
            out.status.success() && about_it.is_empty(),
            "{name}: {said}"
        );
    }
}

#[test]
fn the_units_examples_use_real_flags() {
    for (name, command, variable) in [
        ("picocenter-hub.service", "hub", "HUB_ARGS="),
        ("picocenter-worker.service", "worker", "WORKER_ARGS="),
    ] {
        let text = std::fs::read_to_string(Path::new(UNITS).join(name)).unwrap();
        let example = text
            .lines()
            .find_map(|l| l.trim_start_matches("# ").trim().strip_prefix(variable))
            .unwrap_or_else(|| panic!("{name} has no {variable} example"));
        let help = Command::new(env!("CARGO_BIN_EXE_picocenter"))
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        let flags: Vec<&str> = example
            .split_whitespace()
            .filter(|w| w.starts_with("--"))
            .collect();
        assert!(!flags.is_empty(), "{example}");
        for flag in flags {
            assert!(
                help.contains(&format!("{flag} ")),
                "{name}: `picocenter {command}` has no {flag}"
            );
        }
    }
}
