//! `picocenter ps`.

use super::image::StateDir;
use picocenter_vmm::control::{self, Request, StatsReply};

/// Arguments of `picocenter ps`.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    #[command(flatten)]
    state: StateDir,
}

/// Lists the running picoprocesses of this host, from their control sockets, with the
/// processes of every app that has forked.
pub fn ps(args: PsArgs) -> anyhow::Result<i32> {
    let run = args.state.state_dir().join("run");
    let mut sockets: Vec<_> = std::fs::read_dir(&run)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    sockets.sort();
    println!(
        "{:<24} {:<16} {:>8} {:<10} {:>12} {:>12} {:>10} {:>6}",
        "NAME", "ADDRESS", "PID", "STATE", "MEMORY", "LIMIT", "SYSCALLS", "PROCS"
    );
    for socket in sockets {
        let Ok((reply, _)) = control::request(&socket, &Request::Stats) else {
            continue;
        };
        let Ok(stats) = serde_json::from_str::<StatsReply>(&reply) else {
            continue;
        };
        println!(
            "{:<24} {:<16} {:>8} {:<10} {:>9.1} MiB {:>8} MiB {:>10} {:>6}",
            stats.name,
            stats.address,
            stats.pid,
            stats.state,
            stats.memory_bytes as f64 / (1 << 20) as f64,
            stats.memory_limit_bytes >> 20,
            stats.syscalls,
            stats.processes.len().max(1)
        );
        // An app of several processes lists them: its pid, group and host pid for each.
        if stats.processes.len() > 1 {
            for process in &stats.processes {
                println!(
                    "  pid {:<8} group {:<8} host pid {}",
                    process.pid, process.pgid, process.host_pid
                );
            }
        }
    }
    Ok(0)
}
