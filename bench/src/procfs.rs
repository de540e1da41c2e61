//! The server's and the tool's own resource use, read from /proc (Linux).
//!
//! CPU times come from `/proc/PID/stat` (utime + stime, fields 14 and 15) in clock ticks,
//! converted with `sysconf(_SC_CLK_TCK)`; resident memory from `VmRSS` in `/proc/PID/status`.

use anyhow::Context as _;

/// Clock ticks per second for /proc CPU times (`sysconf(_SC_CLK_TCK)`; 100 if it fails, the
/// value on every common Linux configuration).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime in clock ticks from the text of a `/proc/PID/stat` file. The command name
/// (field 2) is in parentheses and may hold spaces or parentheses itself, so fields are counted
/// from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); utime is field 14, stime field 15.
    let mut it = after.split_ascii_whitespace().skip(11);
    let utime: u64 = it.next()?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time (user + system) of `pid` ("self" for the tool) in seconds.
pub fn cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks =
        parse_stat_cpu_ticks(&text).with_context(|| format!("parsing utime/stime in {path}"))?;
    Ok(ticks as f64 / clk_tck() as f64)
}

/// `VmRSS` in KiB from the text of a `/proc/PID/status` file.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_ascii_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_rss_kib(&text).with_context(|| format!("no VmRSS line in {path}"))
}

/// Open file descriptors of `pid`: the entries of `/proc/PID/fd` (readable for processes of
/// the same user).
pub fn fd_count(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/fd");
    let dir = std::fs::read_dir(&path).with_context(|| format!("reading {path}"))?;
    Ok(dir.filter(|e| e.is_ok()).count() as u64)
}

/// A reading of the server (when `--pid` is given) and of the tool itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub server_cpu: Option<f64>,
    pub server_rss_kib: Option<u64>,
    pub own_cpu: f64,
    pub own_rss_kib: u64,
    pub at: Option<std::time::Instant>,
}

impl Sample {
    /// Reads now. A vanished server process gives `None` figures rather than an error, so a run
    /// still reports what it measured on the client side.
    pub fn take(pid: Option<u32>) -> Sample {
        let server = pid.map(|p| p.to_string());
        Sample {
            server_cpu: server.as_deref().and_then(|p| cpu_secs(p).ok()),
            server_rss_kib: server.as_deref().and_then(|p| rss_kib(p).ok()),
            own_cpu: cpu_secs("self").unwrap_or(0.0),
            own_rss_kib: rss_kib("self").unwrap_or(0),
            at: Some(std::time::Instant::now()),
        }
    }
}

/// CPU used between two samples: (server seconds, tool seconds, wall seconds).
pub fn cpu_between(a: &Sample, b: &Sample) -> (Option<f64>, f64, f64) {
    let server = match (a.server_cpu, b.server_cpu) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let wall = match (a.at, b.at) {
        (Some(x), Some(y)) => y.saturating_duration_since(x).as_secs_f64(),
        _ => 0.0,
    };
    (server, b.own_cpu - a.own_cpu, wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let s = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 8 0 100 1000 50";
        assert_eq!(parse_stat_cpu_ticks(s), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_rss() {
        let s = "Name:\thalyard\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_kib(s), Some(12345));
        assert_eq!(parse_status_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(cpu_secs("self").is_ok());
        assert!(rss_kib("self").is_ok_and(|k| k > 0));
        assert!(clk_tck() > 0);
        // stdin/stdout/stderr at least (the test harness may close some), and the read_dir
        // handle itself.
        assert!(fd_count("self").is_ok_and(|n| n >= 1));
    }
}
