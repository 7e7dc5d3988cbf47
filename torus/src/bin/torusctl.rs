//! `torusctl`: operate a Torus cluster.
//!
//! Talks to etcd directly with `--etcd HOST:PORT` (or `-C`, or
//! `TORUS_ETCD`), from any machine that reaches it; otherwise to a node's
//! admin endpoint (`--server`, default the local node at
//! http://127.0.0.1:4321). Both run the same operations. `certs` makes peer
//! TLS certificates locally and talks to neither. Errors are one line
//! on stderr and exit status 1.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use torus::cluster::InitParams;
use torus::control::Control;
use torus_traits::ByteSize;

#[derive(Parser, Debug)]
#[command(name = "torusctl", version, about = "Operate a Torus cluster")]
struct Args {
    /// Admin endpoint of a torus node.
    #[arg(
        long,
        short = 's',
        env = "TORUS_SERVER",
        default_value = "http://127.0.0.1:4321",
        global = true
    )]
    server: String,
    /// Talk to etcd directly: HOST:PORT[,HOST:PORT…].
    #[arg(long, short = 'C', env = "TORUS_ETCD", global = true)]
    etcd: Option<String>,
    /// CA certificate to verify etcd with.
    #[arg(long, global = true, value_name = "FILE")]
    etcd_ca_file: Option<std::path::PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, global = true, value_name = "FILE")]
    etcd_cert_file: Option<std::path::PathBuf>,
    /// Client key for etcd.
    #[arg(long, global = true, value_name = "FILE")]
    etcd_key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Initialise a new cluster (chunk size and default replication are fixed here).
    Init {
        /// Chunk size: the unit of placement and replication.
        #[arg(long, default_value = "4MiB")]
        block_size: String,
        /// Copies of each chunk.
        #[arg(long, default_value_t = 1)]
        replication: u32,
    },
    /// Manage volumes.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// List peers: address, id, pool size and use, membership, last heartbeat.
    ListPeers {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Change ring membership.
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Show or change the ring.
    Ring {
        #[command(subcommand)]
        command: RingCommand,
    },
    /// Create a cluster CA and node certificates for peer TLS (local files only).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create the cluster CA: DIR/ca.crt and DIR/ca.key.
    Init {
        /// Directory for the certificates.
        #[arg(long, default_value = "torus-certs")]
        dir: std::path::PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u64,
    },
    /// Create DIR/NAME.crt and DIR/NAME.key for a node, signed by the CA in DIR.
    Node {
        /// The node's name (also a DNS name on the certificate).
        name: String,
        /// Directory holding the CA; the node's files go there too.
        #[arg(long, default_value = "torus-certs")]
        dir: std::path::PathBuf,
        /// Further IP addresses for the certificate (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// Further DNS names for the certificate (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u64,
    },
}

#[derive(Subcommand, Debug)]
enum PeerCommand {
    /// Add peers (by address or UUID, as `list-peers` shows them) to the ring.
    Add {
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Take peers out of the ring.
    Remove {
        #[arg(required = true)]
        peers: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum RingCommand {
    /// Print the ring: version, replication, members and weights.
    Get,
    /// Set the replication new volumes get.
    SetReplication { replication: u32 },
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a thin-provisioned block volume, e.g. `create-block pad 1GiB`.
    CreateBlock { name: String, size: String },
    /// List volumes.
    List {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and free its space.
    Delete { name: String },
    /// Compare every copy of every block of a volume and repair the ones
    /// that differ or fail their checksum; prints what it found and fixed.
    /// The volume's writer (or a rebalancer, if nobody has it open) runs it.
    Scrub {
        name: String,
        /// Give up waiting for the result after this long, e.g. 10m.
        #[arg(long, default_value = "30m")]
        timeout: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("torusctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("torusctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<ByteSize>()
        .map(|b| b.0)
        .map_err(|e| e.to_string())
}

fn ring_text(ring: &torus_traits::Ring) -> String {
    let rows: Vec<Vec<String>> = ring
        .members
        .iter()
        .map(|m| vec![m.id.to_string(), ByteSize(m.weight).to_string()])
        .collect();
    format!(
        "Ring version {}, replication {}\n{}",
        ring.version,
        ring.replication,
        torus::cli::table(&["UUID", "WEIGHT"], &rows)
    )
}

async fn control(args: &Args) -> Result<Box<dyn Control>, String> {
    match &args.etcd {
        Some(endpoints) => {
            let tls = args
                .etcd_ca_file
                .clone()
                .map(|ca_file| torus_backends::metadata::EtcdTls {
                    ca_file,
                    cert_file: args.etcd_cert_file.clone(),
                    key_file: args.etcd_key_file.clone(),
                });
            let cfg = torus_backends::metadata::EtcdConfig {
                endpoints: endpoints
                    .split(',')
                    .map(|e| torus::config::strip_scheme(e.trim()).to_string())
                    .collect(),
                tls,
                ..Default::default()
            };
            let meta = torus_backends::metadata::EtcdMetadata::connect(cfg)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Box::new(torus::control::MetaControl::new(
                std::sync::Arc::new(meta),
            )))
        }
        None => Ok(Box::new(
            torus::admin::AdminClient::new(&args.server).map_err(|e| e.to_string())?,
        )),
    }
}

async fn run(args: Args) -> Result<String, String> {
    // Certificates are local files: no cluster to talk to.
    if let Command::Certs { command } = &args.command {
        return match command {
            CertsCommand::Init { dir, days } => torus::certs::init(dir, *days),
            CertsCommand::Node {
                name,
                dir,
                ip,
                dns,
                days,
            } => {
                let extra: Vec<String> = dns
                    .iter()
                    .cloned()
                    .chain(ip.iter().map(|i| i.to_string()))
                    .collect();
                torus::certs::node(dir, name, &extra, *days)
            }
        }
        .map_err(|e| e.to_string());
    }
    let ctl = control(&args).await?;
    let ctl: &dyn Control = &*ctl;
    let e = |e: torus_traits::Error| e.to_string();
    match args.command {
        Command::Init {
            block_size,
            replication,
        } => {
            let params = InitParams {
                chunk_size: parse_size(&block_size)?,
                replication,
            };
            let c = ctl.init(params).await.map_err(e)?;
            Ok(format!(
                "initialised cluster: block size {}, replication {}\n",
                ByteSize(c.chunk_size),
                c.replication
            ))
        }
        Command::Volume { command } => match command {
            VolumeCommand::CreateBlock { name, size } => {
                let size = parse_size(&size)?;
                let v = ctl.create_volume(&name, size).await.map_err(e)?;
                Ok(format!(
                    "created volume {} ({})\n",
                    v.name,
                    ByteSize(v.size)
                ))
            }
            VolumeCommand::List { json } => {
                let vols = ctl.list_volumes().await.map_err(e)?;
                if json {
                    serde_json::to_string_pretty(&vols)
                        .map(|s| s + "\n")
                        .map_err(|e| e.to_string())
                } else {
                    Ok(torus::cli::volume_table(&vols))
                }
            }
            VolumeCommand::Delete { name } => {
                let v = ctl.delete_volume(&name).await.map_err(e)?;
                Ok(format!("deleted volume {}\n", v.name))
            }
            VolumeCommand::Scrub { name, timeout } => {
                let limit = humantime::parse_duration(&timeout)
                    .map_err(|err| format!("--timeout {timeout:?}: {err}"))?;
                let id = ctl.request_scrub(&name).await.map_err(e)?;
                let deadline = std::time::Instant::now() + limit;
                // Bounded by --timeout.
                loop {
                    if let Some(r) = ctl.scrub_result(&name).await.map_err(e)? {
                        if r.request == id {
                            return torus::cli::scrub_text(&name, &r);
                        }
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(format!(
                            "no scrub result for {name} after {timeout}: is a node running?"
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        },
        Command::Peer { command } => {
            let ring = match command {
                PeerCommand::Add { peers } => ctl.add_peers(&peers).await.map_err(e)?,
                PeerCommand::Remove { peers } => ctl.remove_peers(&peers).await.map_err(e)?,
            };
            Ok(ring_text(&ring))
        }
        Command::Ring { command } => {
            let ring = match command {
                RingCommand::Get => ctl.ring().await.map_err(e)?,
                RingCommand::SetReplication { replication } => {
                    ctl.set_replication(replication).await.map_err(e)?
                }
            };
            Ok(ring_text(&ring))
        }
        Command::Certs { .. } => unreachable!("handled above"),
        Command::ListPeers { json } => {
            let peers = ctl.list_peers().await.map_err(e)?;
            if json {
                serde_json::to_string_pretty(&peers)
                    .map(|s| s + "\n")
                    .map_err(|e| e.to_string())
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let balance = ctl.balance().await.map_err(e)?;
                Ok(torus::cli::peer_table(&peers, now, &balance))
            }
        }
    }
}
