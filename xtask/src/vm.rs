//! `cargo xtask test --kernel SERIES`: the integration tests inside a qemu guest that
//! boots Debian's newest kernel of that series (e.g. `6.1`, Debian 12's LTS kernel).
//!
//! The kernel package is fetched by name (`apt-get download`) and unpacked under
//! target/kernels/, never installed on the host; virtme-ng boots it over the host's own
//! filesystem (read-only, with writable overlays), so the guest runs the test binaries
//! built here. qemu emulates the CPU (TCG): hardware virtualisation is not assumed.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{cargo, count_passed, output, status, workspace};

/// Debian packages the guest needs on the host: qemu, and busybox and kmod, which
/// virtme-ng puts in the guest's initramfs.
pub const APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];

/// The virtme-ng release this runs (PyPI).
const VIRTME_NG: &str = "1.42";

/// Modules the tests need that Debian builds as modules: veth pairs and bridges for the
/// labs, clsact and cls_bpf for the tc programs, tun for the fake outside client, and
/// netfilter for the nodes' rules (iptables-nft with xt matches, masquerade) and podman.
const GUEST_MODULES: &[&str] = &[
    "veth",
    "bridge",
    "tun",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_masq",
    "nf_conntrack",
    "nf_nat",
    "xt_conntrack",
    "xt_MASQUERADE",
    "xt_addrtype",
    "xt_comment",
    "xt_mark",
    "xt_nat",
    "iptable_filter",
    "iptable_nat",
    "ip6table_filter",
    "ip6table_nat",
    "overlay",
];

/// Test binaries left out in the guest, each with the reason printed: they exercise the
/// agent's user-space parts (the HTTP server, the image, manifest reading) or compose
/// what the other binaries test one by one (the demo), the same on every kernel; the
/// guest's time goes to the tests of the kernel's side (CI runs both suites).
const HOST_ONLY: &[(&str, &str)] = &[
    ("http", "the HTTP server's limits, user-space code"),
    (
        "image",
        "the container image's build and start, no kernel feature of ours",
    ),
    ("manifest_edits", "manifest reading, user-space code"),
    ("manifests", "manifest reading, user-space code"),
    (
        "demo",
        "the demo composes the socket and packet levels that socket, sockets and packet test here",
    ),
];

/// Tests each binary runs at once in the guest: one per virtual CPU. Under emulation a
/// test spends most of its time in one CPU-bound process (the verifier, an agent's
/// sync), so two at a time nearly halve the run; the tests keep their names and
/// resources apart, as on the host where they run in parallel too.
const GUEST_TEST_THREADS: usize = 2;

/// How long one test binary may run in the guest, and the whole guest.
const BINARY_TIMEOUT_S: u64 = 1200;
const GUEST_TIMEOUT_S: u64 = 2700;

/// An integration test binary: its name (the file under lb-user/tests/) and its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// A kernel unpacked under target/kernels/: its release (`uname -r`) and the directory
/// that holds boot/ and lib/modules/.
struct Kernel {
    release: String,
    root: PathBuf,
}

/// The test binaries that read what [`crate::test_env`] builds (the image, the upgrade
/// test's second agent).
const NEED_TEST_ENV: &[&str] = &["image", "restart"];

/// Runs the integration test binaries in a guest with the newest kernel of `series`;
/// only those named in `only` when it is not empty.
pub fn test(series: &str, only: &[String]) -> anyhow::Result<()> {
    crate::require_root("`cargo xtask test --kernel`")?;
    crate::ensure_setup()?;
    crate::install_apt_packages(APT_PACKAGES)?;
    let vng = virtme_ng()?;
    let kernel = kernel(series)?;
    let needs_env = only.is_empty() || only.iter().any(|t| NEED_TEST_ENV.contains(&t.as_str()));
    let env = if needs_env {
        crate::test_env()?
    } else {
        Vec::new()
    };
    let binaries = select(build_test_binaries(&env)?, only)?;
    if binaries.is_empty() {
        bail!("cargo built no integration test binary of lb-user");
    }
    let out = workspace().join("target/vm/out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let script = out.with_file_name("guest.sh");
    std::fs::write(&script, guest_script(&binaries, &env, &out))
        .with_context(|| format!("writing {}", script.display()))?;
    let started = Instant::now();
    boot(&vng, &kernel, &script, &out)?;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    eprintln!("xtask test --kernel {series}: the guest ran {minutes:.1} min");
    report(&out, &kernel)
}

/// The `vng` of virtme-ng [`VIRTME_NG`], installed with pip when missing.
fn virtme_ng() -> anyhow::Result<PathBuf> {
    let scripts = output(Command::new("python3").args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]))
    .context("python3 is needed for virtme-ng (`apt-get install python3-pip`)")?;
    let vng = Path::new(scripts.trim()).join("vng");
    let wanted = format!("virtme-ng {VIRTME_NG}");
    if output(Command::new(&vng).arg("--version")).is_some_and(|v| v.trim() == wanted) {
        return Ok(vng);
    }
    status(
        Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG}"))
            // Debian's own python3 refuses packages outside apt without this.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1"),
    )?;
    if output(Command::new(&vng).arg("--version")).is_none_or(|v| v.trim() != wanted) {
        bail!(
            "pip installed virtme-ng {VIRTME_NG}, but {} does not answer `--version` with it",
            vng.display()
        );
    }
    Ok(vng)
}

/// The newest `linux-image-SERIES.*-amd64-unsigned` that apt knows, fetched and unpacked
/// under target/kernels/PACKAGE/ (once: a later run finds it there).
fn kernel(series: &str) -> anyhow::Result<Kernel> {
    let package = match newest_kernel_package(series)? {
        Some(p) => p,
        None => {
            status(Command::new("apt-get").args(["update", "-q"]))?;
            newest_kernel_package(series)?.with_context(|| {
                format!(
                    "no Debian package linux-image-{series}.*-amd64-unsigned in the apt sources \
                     (`apt-cache search linux-image`): --kernel {series} cannot be had here"
                )
            })?
        }
    };
    let dir = workspace().join("target/kernels").join(&package);
    let root = dir.join("root");
    let ready = dir.join("ready");
    if let Ok(release) = std::fs::read_to_string(&ready) {
        eprintln!("kernel: {package} (cached in {})", dir.display());
        return Ok(Kernel {
            release: release.trim().to_string(),
            root,
        });
    }
    eprintln!("kernel: fetching {package}");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    status(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&dir),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let release = kernel_release(&root)?;
    status(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    // The package is unpacked; the .deb is not needed again.
    std::fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    std::fs::write(&ready, &release)?;
    Ok(Kernel { release, root })
}

fn newest_kernel_package(series: &str) -> anyhow::Result<Option<String>> {
    let names = output(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))
        .context("`apt-cache pkgnames` failed")?;
    Ok(newest_kernel(names.lines(), series))
}

/// Of Debian's kernel package names, the newest plain (not cloud, not rt) amd64 kernel
/// of `series` without a signature (`linux-image-6.1.0-57-amd64-unsigned`,
/// `linux-image-6.12.118+deb12-amd64-unsigned`), compared number by number.
fn newest_kernel<'a>(names: impl Iterator<Item = &'a str>, series: &str) -> Option<String> {
    let version = |name: &str| -> Option<Vec<u64>> {
        let v = name
            .strip_prefix("linux-image-")?
            .strip_suffix("-amd64-unsigned")?;
        let rest = v.strip_prefix(series)?.strip_prefix('.')?;
        // Only digits, dots and dashes, then an optional "+debNN".
        let (numbers, suffix) = rest.split_once('+').unwrap_or((rest, ""));
        let plain =
            |s: &str, extra: &[char]| s.chars().all(|c| c.is_ascii_digit() || extra.contains(&c));
        if !plain(numbers, &['.', '-'])
            || !(suffix.is_empty() || plain(suffix.trim_start_matches("deb"), &[]))
        {
            return None;
        }
        Some(
            v.split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap_or(0))
                .collect(),
        )
    };
    names
        .filter_map(|n| Some((version(n.trim())?, n.trim())))
        .max()
        .map(|(_, n)| n.to_string())
}

/// The release of the one kernel under `root` (its lib/modules/RELEASE directory, which
/// boot/vmlinuz-RELEASE must match).
fn kernel_release(root: &Path) -> anyhow::Result<String> {
    let modules = root.join("lib/modules");
    let releases: Vec<String> = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let [release] = releases.as_slice() else {
        bail!(
            "{}: expected one kernel release, found {releases:?}",
            modules.display()
        );
    };
    let image = root.join(format!("boot/vmlinuz-{release}"));
    if !image.is_file() {
        bail!("the kernel package has no {}", image.display());
    }
    Ok(release.clone())
}

/// `cargo test --workspace --no-run` (the build the host suite ran, so nothing is built
/// twice) with the tests' environment; the integration test binaries of lb-user, which
/// cargo names in its JSON messages.
fn build_test_binaries(env: &[(&'static str, OsString)]) -> anyhow::Result<Vec<TestBinary>> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-run", "--message-format=json"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::inherit());
    eprintln!("+ {cmd:?}");
    let out = cmd.output().context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed ({})", out.status);
    }
    let tests = workspace().join("lb-user/tests");
    let mut binaries: Vec<TestBinary> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| test_binary(line, &tests))
        .collect();
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(binaries)
}

/// The binaries named in `only` (all when it is empty); an error for a name that is
/// not one of them, listing the names.
fn select(binaries: Vec<TestBinary>, only: &[String]) -> anyhow::Result<Vec<TestBinary>> {
    if let Some(unknown) = only
        .iter()
        .find(|t| !binaries.iter().any(|b| &b.name == *t))
    {
        let names: Vec<&str> = binaries.iter().map(|b| b.name.as_str()).collect();
        bail!(
            "--test {unknown}: no such integration test binary of lb-user (there are: {})",
            names.join(", ")
        );
    }
    Ok(binaries
        .into_iter()
        .filter(|b| only.is_empty() || only.contains(&b.name))
        .collect())
}

/// The test binary a cargo JSON message names, if it is an integration test whose
/// source is a file directly in `tests` (lb-user/tests/NAME.rs).
fn test_binary(line: &str, tests: &Path) -> Option<TestBinary> {
    if json_str(line, "reason")? != "compiler-artifact" || !line.contains(r#""kind":["test"]"#) {
        return None;
    }
    let src = PathBuf::from(json_str(line, "src_path")?);
    if src.parent()? != tests {
        return None;
    }
    Some(TestBinary {
        name: src.file_stem()?.to_string_lossy().into_owned(),
        path: json_str(line, "executable")?.into(),
    })
}

/// The string value of the first `"key":"..."` in a line of JSON (cargo writes its
/// messages on one line without spaces), unescaped; None when absent or not a string.
fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = line[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                c => value.push(c),
            },
            c => value.push(c),
        }
    }
}

/// `s` quoted for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs: the BPF prerequisites (locked memory, bpffs, modules),
/// then each test binary from lb-user/ (as cargo runs them), its
/// output on the console and in OUT/log, its exit status and seconds in OUT/status, and
/// 0 or 1 in OUT/rc once every binary ran.
fn guest_script(binaries: &[TestBinary], env: &[(&'static str, OsString)], out: &Path) -> String {
    let q = |p: &Path| sh_quote(&p.to_string_lossy());
    let mut s = String::from(
        "#!/bin/bash\n# Written by `cargo xtask test --kernel`; runs inside the guest.\nset -u\n",
    );
    s += &format!("OUT={}\n", q(out));
    s += "echo \"guest: Linux $(uname -r), $(nproc) CPUs\"\n";
    s += "ulimit -l unlimited\n";
    s += "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n";
    // podman's overlay storage cannot sit on the guest's overlay of /var: a tmpfs.
    s += "mkdir -p /var/lib/containers && mount -t tmpfs tmpfs /var/lib/containers\n";
    s += &format!(
        "for m in {}; do modprobe -q \"$m\" || echo \"guest: no module $m\"; done\n",
        GUEST_MODULES.join(" ")
    );
    let path = std::env::var("PATH").unwrap_or_default();
    s += &format!("export PATH={}:/usr/sbin:/sbin\n", sh_quote(&path));
    for (k, v) in env {
        s += &format!("export {k}={}\n", sh_quote(&v.to_string_lossy()));
    }
    // The verifier is slow under emulation: agents get longer to load and sync.
    s += "export LB_TEST_SYNC_TIMEOUT_S=300\n";
    s += &format!("cd {}\n", q(&workspace().join("lb-user")));
    s += "rc=0\n";
    for b in binaries {
        if let Some((_, why)) = HOST_ONLY.iter().find(|(name, _)| *name == b.name) {
            s += &format!(
                "echo {}\n",
                sh_quote(&format!("guest: leaving out {}: {why}", b.name))
            );
            continue;
        }
        let args = [format!("--test-threads={GUEST_TEST_THREADS}")];
        s += &format!(
            "echo '== {}' | tee -a \"$OUT/log\"\nstart=$(date +%s)\n",
            b.name
        );
        s += &format!(
            "timeout --kill-after=10 {BINARY_TIMEOUT_S} {} {} 2>&1 | tee -a \"$OUT/log\"\n",
            q(&b.path),
            args.join(" ")
        );
        s += "st=${PIPESTATUS[0]}\n";
        s += &format!(
            "echo \"{} $st $(( $(date +%s) - start ))\" >> \"$OUT/status\"\n",
            b.name
        );
        s += "[ \"$st\" -eq 0 ] || rc=1\n";
    }
    s += "echo \"$rc\" > \"$OUT/rc\"\n";
    s
}

/// Boots `kernel` with virtme-ng over the host's filesystem (OUT writable) and runs
/// `script`; the guest's output streams to this console. vng's own exit status says
/// nothing (255 without udev): the script's files under OUT say how the tests went.
fn boot(vng: &Path, kernel: &Kernel, script: &Path, out: &Path) -> anyhow::Result<()> {
    let image = kernel.root.join(format!("boot/vmlinuz-{}", kernel.release));
    let mut rwdir = OsString::from("--rwdir=");
    rwdir.push(out);
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=30", &GUEST_TIMEOUT_S.to_string()])
        .arg(vng)
        .arg("--run")
        .arg(&image)
        // No hardware virtualisation assumed (a PVM /dev/kvm cannot boot this kernel).
        .args([
            "--disable-kvm",
            "--force-9p",
            "--cpus",
            "2",
            "--memory",
            "4G",
        ])
        .arg(rwdir)
        .arg("--exec")
        .arg(format!("bash {}", sh_quote(&script.to_string_lossy())))
        .current_dir(workspace())
        .stdin(Stdio::null())
        // qemu opens its output with O_TRUNC: given a file (a CI log), it would empty
        // it. Through pipes, copied here, the log keeps what came before.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", vng.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let copy_out = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::stdout()));
    let copy_err = std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));
    // Without udev in the guest, virtme-ng's console ports never reach the host: the
    // guest's output is what its script writes to OUT/log, shown here as it grows.
    let log = out.join("log");
    let mut shown = 0;
    let st = loop {
        let done = child.try_wait()?;
        shown = show_from(&log, shown, &mut std::io::stdout());
        if let Some(st) = done {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    let _ = (copy_out.join(), copy_err.join());
    if st.code() == Some(124) {
        bail!("the guest did not finish within {GUEST_TIMEOUT_S} s");
    }
    Ok(())
}

/// Writes what `path` holds past byte `from` to `to`; returns where it ended (`from`
/// while the file does not exist yet).
fn show_from(path: &Path, from: u64, to: &mut impl std::io::Write) -> u64 {
    use std::io::{Read as _, Seek as _};
    let Ok(mut file) = std::fs::File::open(path) else {
        return from;
    };
    let mut new = Vec::new();
    if file.seek(std::io::SeekFrom::Start(from)).is_err() || file.read_to_end(&mut new).is_err() {
        return from;
    }
    let _ = to.write_all(&new).and_then(|()| to.flush());
    from + new.len() as u64
}

/// Each binary's exit status, seconds and passed tests, from the guest's files; an error
/// when one failed, when the guest stopped early, or when no test passed.
fn report(out: &Path, kernel: &Kernel) -> anyhow::Result<()> {
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let statuses = read("status");
    let passed: usize = read("log").lines().map(count_passed).sum();
    let mut failed = Vec::new();
    eprintln!(
        "guest (Linux {}): binary, exit status, seconds",
        kernel.release
    );
    for line in statuses.lines() {
        eprintln!("  {line}");
        let mut f = line.split_whitespace();
        if let (Some(name), Some(st)) = (f.next(), f.next())
            && st != "0"
        {
            failed.push(name.to_string());
        }
    }
    if read("rc").trim().is_empty() {
        bail!(
            "the guest stopped before every test binary ran (its output is above, and in {})",
            out.display()
        );
    }
    if !failed.is_empty() {
        bail!(
            "tests failed in the guest (Linux {}): {}",
            kernel.release,
            failed.join(", ")
        );
    }
    if passed == 0 {
        bail!("no test ran in the guest");
    }
    eprintln!(
        "xtask test --kernel: {passed} tests passed on Linux {}",
        kernel.release
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_plain_kernel_of_the_series_is_chosen() {
        let names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-58-rt-amd64-unsigned",
            "linux-image-6.1.0-58-amd64",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.12.118+deb12-amd64-unsigned",
            "linux-image-6.12.99+deb12-amd64-unsigned",
            "linux-image-amd64",
        ];
        let newest = |s| newest_kernel(names.iter().copied(), s);
        assert_eq!(
            newest("6.1").as_deref(),
            Some("linux-image-6.1.0-57-amd64-unsigned")
        );
        assert_eq!(
            newest("6.12").as_deref(),
            Some("linux-image-6.12.118+deb12-amd64-unsigned")
        );
        assert_eq!(newest("5.15"), None);
        // 6.1 is not a prefix of 6.12.
        let only_612 = ["linux-image-6.12.118+deb12-amd64-unsigned"];
        assert_eq!(newest_kernel(only_612.iter().copied(), "6.1"), None);
    }

    #[test]
    fn cargo_messages_name_the_integration_test_binaries() {
        let tests = Path::new("/w/lb-user/tests");
        let msg = |kind: &str, src: &str, exe: &str| {
            format!(
                r#"{{"reason":"compiler-artifact","package_id":"path+file:///w/lb-user#0.1.0","target":{{"kind":["{kind}"],"crate_types":["bin"],"name":"x","src_path":"{src}","edition":"2024"}},"executable":{exe},"fresh":true}}"#
            )
        };
        let packet = msg(
            "test",
            "/w/lb-user/tests/packet.rs",
            r#""/w/target/debug/deps/packet-1a""#,
        );
        assert_eq!(
            test_binary(&packet, tests),
            Some(TestBinary {
                name: "packet".into(),
                path: "/w/target/debug/deps/packet-1a".into()
            })
        );
        // The lib's unit tests, a helper module's file, a library without an executable.
        let lib = msg(
            "lib",
            "/w/lb-user/src/lib.rs",
            r#""/w/target/debug/deps/lb_user-2b""#,
        );
        let common = msg("test", "/w/lb-user/tests/common/mod.rs", r#""/x""#);
        let no_exe = msg("test", "/w/lb-user/tests/packet.rs", "null");
        for line in [
            lib,
            common,
            no_exe,
            r#"{"reason":"build-finished","success":true}"#.into(),
        ] {
            assert_eq!(test_binary(&line, tests), None, "{line}");
        }
        assert_eq!(
            json_str(r#"{"a":"x\"y\\z"}"#, "a").as_deref(),
            Some(r#"x"y\z"#)
        );
    }

    #[test]
    fn test_names_choose_the_guests_binaries() {
        let all = || {
            ["packet", "socket"].map(|n| TestBinary {
                name: n.into(),
                path: format!("/w/{n}-1").into(),
            })
        };
        assert_eq!(select(all().into(), &[]).unwrap().len(), 2);
        let one = select(all().into(), &["socket".into()]).unwrap();
        assert_eq!(one, [all()[1].clone()]);
        let err = select(all().into(), &["sockte".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--test sockte: no such integration test binary of lb-user (there are: packet, socket)"
        );
    }

    #[test]
    fn the_guests_log_is_shown_as_it_grows() {
        let path = std::env::temp_dir().join(format!("lb-xtask-log-{}", std::process::id()));
        let mut shown = Vec::new();
        assert_eq!(show_from(&path, 0, &mut shown), 0);
        std::fs::write(&path, "one\n").unwrap();
        let at = show_from(&path, 0, &mut shown);
        std::fs::write(&path, "one\ntwo\n").unwrap();
        let at = show_from(&path, at, &mut shown);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            (at, String::from_utf8(shown).unwrap()),
            (8, "one\ntwo\n".into())
        );
    }

    #[test]
    fn the_guest_script_quotes_and_leaves_out() {
        let binaries = [
            TestBinary {
                name: "socket".into(),
                path: "/w/it's/socket-1".into(),
            },
            TestBinary {
                name: "clusterip".into(),
                path: "/w/clusterip-2".into(),
            },
            TestBinary {
                name: "http".into(),
                path: "/w/http-3".into(),
            },
        ];
        let env = [("LB_IMAGE_ARCHIVE", OsString::from("/w/a b.tar"))];
        let s = guest_script(&binaries, &env, Path::new("/w/out"));
        assert!(s.contains(r"'/w/it'\''s/socket-1' --test-threads=2"), "{s}");
        assert!(s.contains("export LB_IMAGE_ARCHIVE='/w/a b.tar'\n"), "{s}");
        assert!(s.contains("echo \"$rc\" > \"$OUT/rc\""), "{s}");
        assert!(s.contains("guest: leaving out http: "), "{s}");
        assert!(!s.contains("/w/http-3"), "{s}");
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
