//! `port-trace doctor`: which hooks this kernel allows, and why not.

use anyhow::Result;
use serde::Serialize;

use crate::cli::DoctorArgs;
use crate::kernel::{self, Probe};
use crate::{privileges, system};

#[derive(Serialize)]
struct Row<'a> {
    hook: &'a str,
    backend: &'a str,
    available: bool,
    reason: Option<&'a str>,
}

/// The backend `auto` picks, and why the better ones are out.
fn choose(probes: &[Probe]) -> (String, Vec<String>) {
    let status = |backend: &str| probes.iter().filter(|p| p.backend == backend).all(|p| p.result.is_ok());
    let mut why_not = Vec::new();
    for (backend, what) in [("precise", "fentry/fexit"), ("kprobe", "kprobes")] {
        if let Some(Err(reason)) = probes.iter().find(|p| p.backend == backend).map(|p| &p.result) {
            why_not.push(format!("{backend}: {what} {reason}"));
        } else {
            why_not.push(format!(
                "{backend}: the kernel allows {what}, but this version implements only the portable backend"
            ));
        }
    }
    let portable = if status("portable") { "portable" } else { "portable (partial: some hooks refused)" };
    (portable.to_string(), why_not)
}

/// Runs `doctor`: probes every hook, prints a table (or JSON), exits 0.
pub fn run(args: DoctorArgs) -> Result<()> {
    let missing = privileges::missing_capabilities();
    if !missing.is_empty() {
        anyhow::bail!(privileges::missing_message(&missing));
    }
    let probes = kernel::probe_all(args.verbose)?;
    let (chosen, why_not) = choose(&probes);
    if args.json {
        let rows: Vec<Row> = probes
            .iter()
            .map(|p| Row {
                hook: &p.hook,
                backend: p.backend,
                available: p.result.is_ok(),
                reason: p.result.as_ref().err().map(String::as_str),
            })
            .collect();
        let doc = serde_json::json!({
            "kernel": system::kernel_release(),
            "btf": std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            "tracefs": system::tracefs_root(),
            "cgroup2": system::cgroup2_root(),
            "hooks": rows,
            "backend": chosen,
            "not_chosen": why_not,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("kernel   {}", system::kernel_release());
    println!(
        "BTF      {}",
        if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() { "/sys/kernel/btf/vmlinux" } else { "missing" }
    );
    println!(
        "tracefs  {}",
        system::tracefs_root()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not mounted (watch mounts it in a private mount namespace for itself)".into())
    );
    println!(
        "cgroup2  {}",
        system::cgroup2_root().map(|p| p.display().to_string()).unwrap_or_else(|| "not mounted".into())
    );
    println!();
    println!("{:<38} {:<9} {:<10} DETAIL", "HOOK", "BACKEND", "STATUS");
    for p in &probes {
        let (status, detail) = match &p.result {
            Ok(()) => ("ok", ""),
            Err(reason) => ("refused", reason.as_str()),
        };
        println!("{:<38} {:<9} {:<10} {}", p.hook, p.backend, status, detail);
    }
    println!();
    println!("backend: auto chooses {chosen}");
    for line in why_not {
        println!("  not {line}");
    }
    Ok(())
}
