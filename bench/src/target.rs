//! The server one measurement runs against, whatever it is: spawned (the
//! gateway or the baseline, see `gateway`; nchan or Bun, see `peers`) or
//! attached, and the figures every scenario takes of it (memory, CPU,
//! connections held).

use std::net::SocketAddr;
use std::time::Duration;

use crate::cli::{Server, ServerKind};
use crate::gateway::Gateway;
use crate::http;
use crate::peers::{Bun, Nginx};
use crate::procfs;
use crate::tls::{ClientTls, TlsSetup};

/// A server this run started; dropping it stops it.
enum Spawned {
    /// The gateway or the baseline.
    Gateway(Gateway),
    Nginx(Nginx),
    Bun(Bun),
}

impl Spawned {
    fn alive(&mut self) -> Result<(), String> {
        match self {
            Spawned::Gateway(g) => g.alive(),
            Spawned::Nginx(n) => n.alive(),
            Spawned::Bun(b) => b.process.alive(),
        }
    }

    fn stop(&mut self) {
        match self {
            Spawned::Gateway(g) => g.stop(),
            Spawned::Nginx(n) => n.stop(),
            Spawned::Bun(b) => b.process.stop(),
        }
    }
}

/// The server one measurement runs against: spawned (and stopped when this
/// is dropped) or attached.
pub struct Target {
    pub kind: ServerKind,
    pub pid: u32,
    pub listen: SocketAddr,
    /// Where a publisher connects (`None`: the server binds none / not given).
    pub zmq: Option<String>,
    /// Where a hub connects to take what clients send (its READY line's
    /// `upstream=`; `None`: the server binds none, or attached).
    pub upstream: Option<String>,
    /// Where a gRPC client connects: the READY line's `grpc=` (a separate
    /// listener), else the listener (the gateway tells HTTP/2 by its first
    /// bytes; attached servers).
    pub grpc: SocketAddr,
    /// Cores a spawned server was given (`None` when attached; nginx: its
    /// worker processes; Bun: 1, its one JavaScript thread).
    pub cores: Option<u32>,
    /// Its listener speaks TLS, with a certificate this client trusts
    /// (`/healthz` is asked over it too).
    pub tls: Option<ClientTls>,
    spawned: Option<Spawned>,
}

impl Target {
    /// [`Target::start`], with TLS on the server's listener when `tls` is
    /// given (see [`Server::with_tls`]).
    pub fn start_with_tls(
        kind: ServerKind,
        server: &Server,
        tls: Option<&TlsSetup>,
    ) -> Result<Target, String> {
        let Some(tls) = tls else {
            return Target::start(kind, server);
        };
        kind.check_tls()?;
        let mut target = Target::start(kind, &server.with_tls(&tls.files)?)?;
        target.tls = Some(tls.client.clone());
        Ok(target)
    }

    pub fn start(kind: ServerKind, server: &Server) -> Result<Target, String> {
        let (spawned, pid, listen, zmq, upstream, grpc, cores) = match server {
            Server::Spawn {
                bin,
                cores,
                extra_args,
                stderr,
                ready_timeout,
            } => {
                let g = Gateway::spawn(
                    kind.name(),
                    bin,
                    *cores,
                    extra_args,
                    stderr.as_deref(),
                    *ready_timeout,
                )?;
                let (pid, r) = (g.pid(), g.ready.clone());
                (
                    Spawned::Gateway(g),
                    pid,
                    r.listen,
                    r.zmq,
                    r.upstream,
                    r.grpc.unwrap_or(r.listen),
                    *cores,
                )
            }
            Server::Nchan {
                nginx,
                module,
                workers,
                tls,
                ready_timeout,
            } => {
                let n = Nginx::spawn(nginx, module, *workers, tls.as_ref(), *ready_timeout)?;
                let (pid, listen) = (n.pid(), n.listen);
                (Spawned::Nginx(n), pid, listen, None, None, listen, *workers)
            }
            Server::Bun { bin, ready_timeout } => {
                let b = Bun::spawn(bin, *ready_timeout)?;
                let (pid, ready) = (b.process.pid(), b.process.ready.clone());
                (
                    Spawned::Bun(b),
                    pid,
                    ready.listen,
                    ready.zmq,
                    None,
                    ready.listen,
                    1,
                )
            }
            Server::Attach { pid, target, zmq } => {
                return Ok(Target {
                    kind,
                    pid: *pid,
                    listen: *target,
                    zmq: zmq.clone(),
                    upstream: None,
                    grpc: *target,
                    cores: None,
                    tls: None,
                    spawned: None,
                })
            }
        };
        eprintln!(
            "bench: {} pid {pid} ready on {listen} (zmq {})",
            kind.name(),
            zmq.as_deref().unwrap_or("-")
        );
        Ok(Target {
            kind,
            pid,
            listen,
            zmq,
            upstream,
            grpc,
            cores: Some(cores),
            tls: None,
            spawned: Some(spawned),
        })
    }

    /// "spawned" or "attached".
    pub fn how(&self) -> &'static str {
        if self.spawned.is_some() {
            "spawned"
        } else {
            "attached"
        }
    }

    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some()
    }

    /// Whether a spawned server still runs (an attached one is assumed to).
    pub fn alive(&mut self) -> Result<(), String> {
        match self.spawned.as_mut() {
            Some(s) => s.alive(),
            None => Ok(()),
        }
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.spawned.as_mut() {
            s.stop();
        }
    }

    /// Whether the server is a group of processes (nginx: a master and its
    /// workers), whose memory and CPU are summed.
    fn is_process_group(&self) -> bool {
        self.kind == ServerKind::Nchan
    }

    /// The server's resident memory: its VmRSS, or for nginx the sum over
    /// the master and its workers.
    pub fn rss_bytes(&self) -> Result<u64, String> {
        if self.is_process_group() {
            procfs::tree_rss_bytes(self.pid)
        } else {
            procfs::rss_bytes(self.pid)
        }
        .map_err(|e| format!("the {}'s memory: {e}", self.kind.name()))
    }

    /// CPU seconds the server has used so far (nginx: master + workers).
    pub fn cpu_seconds(&self) -> Result<f64, String> {
        if self.is_process_group() {
            procfs::tree_cpu_seconds(self.pid)
        } else {
            procfs::cpu_seconds(self.pid)
        }
        .map_err(|e| format!("the {}'s CPU time: {e}", self.kind.name()))
    }

    /// What [`Target::rss_bytes`] adds up, for the tables: "process", or
    /// "nginx master + 2 workers (VmRSS summed)".
    pub fn rss_scope(&self) -> String {
        if self.is_process_group() {
            format!(
                "nginx master + {} workers (VmRSS summed)",
                procfs::children(self.pid).len()
            )
        } else {
            "process".into()
        }
    }

    /// Where [`Target::connections`] counts: the server's `/healthz`, or
    /// its sockets (servers without one).
    pub fn connections_source(&self) -> &'static str {
        if self.kind.has_healthz() {
            "/healthz"
        } else {
            "/proc/net/tcp"
        }
    }

    /// Connections the server holds now: what its `/healthz` says (per
    /// core), or, for nchan and Bun, its ESTABLISHED and CLOSE_WAIT
    /// sockets on its listening address (one total).
    pub fn connections(&self, timeout: Duration) -> Result<Vec<u64>, String> {
        if self.kind.has_healthz() {
            match &self.tls {
                Some(tls) => http::healthz_tls(self.listen, tls, timeout),
                None => http::healthz(self.listen, timeout),
            }
        } else {
            procfs::server_connections(self.listen)
                .map(|n| vec![n])
                .map_err(|e| format!("counting the {}'s sockets: {e}", self.kind.name()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_an_attached_peer() {
        // This test process stands in for an nginx master; a listener of
        // its own for the server's port.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = l.local_addr().unwrap();
        let server = Server::Attach {
            pid: std::process::id(),
            target: listen,
            zmq: None,
        };
        let mut t = Target::start(ServerKind::Nchan, &server).unwrap();
        assert_eq!(
            (t.how(), t.is_spawned(), t.cores),
            ("attached", false, None)
        );
        assert!(t.alive().is_ok());
        assert!(t.rss_bytes().unwrap() > 0);
        assert!(t.cpu_seconds().is_ok());
        assert!(t.rss_scope().starts_with("nginx master + "));
        assert_eq!(t.connections_source(), "/proc/net/tcp");
        assert_eq!(t.connections(Duration::from_secs(1)), Ok(vec![0]));
        let _c = std::net::TcpStream::connect(listen).unwrap();
        let _s = l.accept().unwrap();
        assert_eq!(t.connections(Duration::from_secs(1)), Ok(vec![1]));
        t.stop();
        // The gateway is asked on /healthz (nobody answers here).
        let t = Target::start(ServerKind::Gateway, &server).unwrap();
        assert_eq!(t.connections_source(), "/healthz");
        assert_eq!(t.rss_scope(), "process");
        assert!(t.connections(Duration::from_millis(200)).is_err());
    }
}
