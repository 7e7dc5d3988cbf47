//! `torus-entrypoint`: the container image's entrypoint. Maps the original
//! image's environment variables to `torusd` flags (see
//! `torusblk::entrypoint`), installs the FlexVolume driver when
//! `DROP_MOUNT_BIN` is set, then replaces itself with `torusd`.
//!
//! `TORUSD` and `TORUSBLK` override where the two binaries are (default: next
//! to this one). `torus-entrypoint --print` prints the torusd command instead
//! of running it. Extra arguments are passed on to torusd.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use torusblk::entrypoint;

fn sibling(env_var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn main() -> ExitCode {
    let mut extra: Vec<String> = std::env::args().skip(1).collect();
    let print_only = extra.first().is_some_and(|a| a == "--print");
    if print_only {
        extra.remove(0);
    }
    let env = std::env::vars().collect();
    let plan = match entrypoint::plan(&env) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("torus-entrypoint: {e}");
            return ExitCode::FAILURE;
        }
    };
    let torusd = sibling("TORUSD", "torusd");
    if print_only {
        let mut words = vec![torusd.display().to_string()];
        words.extend(plan.args.iter().cloned());
        words.extend(extra);
        println!("{}", words.join(" "));
        if let Some(to) = &plan.install_driver {
            println!(
                "install {} {}",
                sibling("TORUSBLK", "torusblk").display(),
                to.display()
            );
        }
        return ExitCode::SUCCESS;
    }
    if let Some(to) = &plan.install_driver {
        let from = sibling("TORUSBLK", "torusblk");
        if let Err(e) = entrypoint::install_driver(&from, to) {
            eprintln!("torus-entrypoint: DROP_MOUNT_BIN: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!(
            "torus-entrypoint: installed the FlexVolume driver at {}",
            to.display()
        );
    }
    let err = Command::new(&torusd).args(&plan.args).args(&extra).exec();
    eprintln!("torus-entrypoint: cannot run {}: {err}", torusd.display());
    ExitCode::FAILURE
}
