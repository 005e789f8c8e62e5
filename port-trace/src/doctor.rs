//! `port-trace doctor`: which hooks this kernel allows, and why not.

use anyhow::Result;
use serde::Serialize;

use crate::cli::DoctorArgs;
use crate::kernel::{self, Probe};
use crate::{privileges, system};

#[derive(Serialize)]
struct Row<'a> {
    hook: &'a str,
    mechanism: &'a str,
    backend: &'a str,
    available: bool,
    reason: Option<&'a str>,
}

/// The backend `auto` picks, and why the better ones are out.
fn choose(probes: &[Probe]) -> (String, Vec<String>) {
    let of = |backend: &'static str| probes.iter().filter(move |p| p.backend == backend);
    // Complete when every hook has at least one mechanism the kernel accepts.
    let complete =
        |backend: &'static str| of(backend).all(|p| of(backend).any(|q| q.hook == p.hook && q.result.is_ok()));
    let first_refusal = |backend: &'static str| {
        of(backend).find_map(|p| p.result.as_ref().err().map(|reason| format!("{backend}: {}: {reason}", p.hook)))
    };
    let precise_any = of("precise").any(|p| p.result.is_ok());
    let chosen = if complete("precise") {
        "precise"
    } else if precise_any {
        "precise+portable (portable hooks stand in for the refused precise ones)"
    } else if complete("kprobe") {
        "kprobe"
    } else if complete("portable") {
        "portable"
    } else {
        "portable (partial: some hooks refused)"
    };
    let mut why_not = Vec::new();
    if chosen != "precise" {
        why_not.extend(first_refusal("precise"));
        if !chosen.starts_with("precise") && chosen != "kprobe" {
            why_not.extend(first_refusal("kprobe"));
        }
    }
    (chosen.to_string(), why_not)
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
                mechanism: p.mechanism,
                backend: p.backend,
                available: p.result.is_ok(),
                reason: p.result.as_ref().err().map(String::as_str),
            })
            .collect();
        let doc = serde_json::json!({
            "kernel": system::kernel_release(),
            "btf": std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            "tracefs": system::tracefs_root(),
            "tracefs_private": system::tracefs_is_private(),
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
        match (system::tracefs_root(), system::tracefs_is_private()) {
            (Some(_), true) => "not mounted on the host; port-trace mounts it in a private mount namespace".to_string(),
            (Some(p), false) => p.display().to_string(),
            (None, _) => "not mounted, and a private mount failed: syscall tracepoints are unavailable".to_string(),
        }
    );
    println!(
        "cgroup2  {}",
        system::cgroup2_root().map(|p| p.display().to_string()).unwrap_or_else(|| "not mounted".into())
    );
    println!();
    println!("{:<45} {:<9} {:<8} DETAIL", "HOOK", "BACKEND", "STATUS");
    for p in &probes {
        let (status, detail) = match &p.result {
            Ok(()) => ("ok", ""),
            Err(reason) => ("refused", reason.as_str()),
        };
        let hook = if p.backend == "portable" { format!("{} ({})", p.hook, p.mechanism) } else { p.hook.clone() };
        println!("{:<45} {:<9} {:<8} {}", hook, p.backend, status, detail);
    }
    println!();
    println!("backend: auto chooses {chosen}");
    for line in why_not {
        println!("  not {line}");
    }
    Ok(())
}
