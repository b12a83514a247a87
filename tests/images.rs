//! Images end to end: `picocenter image build` and `image ls` on a fresh state directory,
//! then `picocenter run --image` on real KVM.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// `picocenter ARGS...` with its state in `state`.
fn picocenter_in(state: &Path, args: &[&str]) -> Output {
    let mut cmd = picocenter();
    cmd.env("PICOCENTER_STATE_DIR", state).args(args);
    run_with_limit(&mut cmd, Duration::from_secs(120))
}

fn image_dir(name: &str) -> String {
    format!("{}/images/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn hello_builds_lists_runs_and_is_then_up_to_date() {
    let state = tempfile::tempdir().unwrap();
    let hello = image_dir("hello");
    let out = picocenter_in(state.path(), &["image", "build", &hello]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let rootfs = state.path().join("images/hello/rootfs");
    assert!(
        stdout(&out).starts_with("hello: built in "),
        "{}",
        describe(&out)
    );
    assert!(stdout(&out).contains(rootfs.to_str().unwrap()));
    assert!(rootfs.join("bin/hello").is_file());

    let out = picocenter_in(state.path(), &["image", "ls"]);
    let listing = stdout(&out);
    let row = listing
        .lines()
        .find(|l| l.starts_with("hello "))
        .unwrap_or("");
    assert!(row.ends_with("/bin/hello"), "{listing}");

    let out = picocenter_in(state.path(), &["run", "--image", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), "hello from picocenter, in an image\n");
    let out = picocenter_in(
        state.path(),
        &["run", "--image", "hello", "/bin/hello", "tests"],
    );
    assert_eq!(
        stdout(&out),
        "hello from tests, in an image\n",
        "{}",
        describe(&out)
    );

    let started = Instant::now();
    let out = picocenter_in(state.path(), &["image", "build", &hello]);
    let elapsed = started.elapsed();
    assert!(
        stdout(&out).starts_with("hello: up to date in "),
        "{}",
        describe(&out)
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "an up-to-date check took {elapsed:?}"
    );
}

#[test]
fn running_an_unbuilt_image_says_how_to_build_it() {
    let state = tempfile::tempdir().unwrap();
    let out = picocenter_in(state.path(), &["run", "--image", "hello"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("picocenter image build"), "{stderr}");
}

/// An image of busybox whose writable directory has content in the image: a fresh data
/// directory gets a copy of it, and a reused one keeps what the app wrote. (Only shell
/// builtins: a picoprocess cannot fork.)
#[test]
fn an_images_writable_content_seeds_a_fresh_data_directory() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("seeded");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("seed.txt"), "from the image\n").unwrap();
    std::fs::write(
        dir.join("image.toml"),
        r#"
        [run]
        argv = ["/bin/busybox", "sh", "-c", "read l < /var/lib/app/seed.txt; echo $l; echo $GREETING"]
        env = ["GREETING=hi from the image"]
        writable = ["/var/lib/app", "/tmp"]
        [root]
        host = ["/bin/busybox"]
        dirs = ["/var/lib/app/cache"]
        copy = [{ src = "seed.txt", dest = "/var/lib/app/seed.txt" }]
        "#,
    )
    .unwrap();
    let state = top.path().join("state");
    let out = picocenter_in(&state, &["image", "build", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    let data = top.path().join("data");
    let data_arg = data.to_str().unwrap();
    let out = picocenter_in(
        &state,
        &["run", "--image", "seeded", "--data-dir", data_arg],
    );
    assert_eq!(
        stdout(&out),
        "from the image\nhi from the image\n",
        "{}",
        describe(&out)
    );
    assert!(data.join("var/lib/app/cache").is_dir());

    let script = "echo changed > /var/lib/app/seed.txt && echo /var/lib/app/*";
    let args = ["run", "--image", "seeded", "--data-dir", data_arg];
    let out = picocenter_in(
        &state,
        &[&args[..], &["/bin/busybox", "sh", "-c", script]].concat(),
    );
    assert_eq!(
        stdout(&out),
        "/var/lib/app/cache /var/lib/app/seed.txt\n",
        "{}",
        describe(&out)
    );
    let out = picocenter_in(&state, &args);
    assert_eq!(
        stdout(&out),
        "changed\nhi from the image\n",
        "kept, not seeded again"
    );
    let in_image = state.join("images/seeded/rootfs/var/lib/app/seed.txt");
    assert_eq!(
        std::fs::read_to_string(in_image).unwrap(),
        "from the image\n"
    );
}
