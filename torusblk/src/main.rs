//! `torusblk`: attach Torus volumes on a client machine.
//!
//! - `torusblk nbd VOLUME [/dev/nbdX]`, `torusblk nbd --detach /dev/nbdX`
//! - `torusblk nbdserve [--listen ADDR]`
//! - the FlexVolume driver calls kubelet makes (`init`, `mount DIR JSON`,
//!   `unmount DIR`, …): installed as `<plugin dir>/coreos.com~torus/torus`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use torusblk::attach::{self, AttachRequest, AttacherKind};
use torusblk::flex::{self, Call, Reply};
use torusblk::{client, driver, kernel};

#[derive(Parser, Debug)]
#[command(
    name = "torusblk",
    version,
    about = "Attach Torus volumes: kernel NBD devices, a standalone NBD server, and the Kubernetes FlexVolume driver (init, mount DIR JSON, unmount DIR)"
)]
struct Args {
    /// etcd endpoints of the cluster, HOST:PORT[,HOST:PORT…].
    #[arg(long, short = 'C', global = true, env = "TORUS_ETCD", default_value = flex::DEFAULT_ETCD)]
    etcd: String,
    /// CA certificate to verify etcd with (TLS).
    #[arg(long, global = true, env = "TORUS_ETCD_CA_FILE", value_name = "FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, global = true, env = "TORUS_ETCD_CERT_FILE", value_name = "FILE")]
    etcd_cert_file: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, global = true, env = "TORUS_ETCD_KEY_FILE", value_name = "FILE")]
    etcd_key_file: Option<PathBuf>,
    /// The storage peers' transport, as their `[transport] kind`: tcp or quic.
    #[arg(long, global = true, env = "TORUS_PEER_TRANSPORT", value_name = "KIND")]
    peer_transport: Option<String>,
    /// This client's certificate, signed by the cluster CA (peers with TLS).
    #[arg(long, global = true, env = "TORUS_PEER_CERT_FILE", value_name = "FILE")]
    peer_cert_file: Option<PathBuf>,
    /// The key of --peer-cert-file.
    #[arg(long, global = true, env = "TORUS_PEER_KEY_FILE", value_name = "FILE")]
    peer_key_file: Option<PathBuf>,
    /// The cluster CA peers' certificates must chain to.
    #[arg(long, global = true, env = "TORUS_PEER_CA_FILE", value_name = "FILE")]
    peer_ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Attach VOLUME to a kernel NBD device and serve it until detached or signalled.
    Nbd {
        /// The volume to attach.
        #[arg(required_unless_present = "detach")]
        volume: Option<String>,
        /// The device (default: the first free /dev/nbdN).
        device: Option<PathBuf>,
        /// Detach this device instead.
        #[arg(long, value_name = "DEVICE", conflicts_with_all = ["volume", "device"])]
        detach: Option<PathBuf>,
        /// Attach read-only (takes no lock).
        #[arg(long)]
        read_only: bool,
        /// Pass discards (TRIM) to the volume.
        #[arg(long)]
        trim: bool,
        /// Attach an export of this NBD server (IP:PORT) instead of reaching
        /// the volume through etcd, e.g. the embedded single node's
        /// 127.0.0.1:10809, which then holds the volume's lock.
        #[arg(long, value_name = "ADDR")]
        server: Option<String>,
    },
    /// Serve every volume of the cluster over NBD, without a storage pool.
    Nbdserve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// Serve every volume read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// The attach process a FlexVolume mount leaves behind (internal).
    #[command(hide = true)]
    AttachDaemon {
        #[arg(long)]
        volume: String,
        #[arg(long, value_parser = ["kernel", "nbdfuse"])]
        attacher: String,
        #[arg(long)]
        work_dir: PathBuf,
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        trim: bool,
    },
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // FlexVolume calls: kubelet reads stdout and stderr together as one JSON
    // object, so they print exactly that and nothing else.
    if argv.first().is_some_and(|a| flex::is_flex_call(a)) {
        let reply = flexvolume(&argv);
        println!("{}", reply.to_json());
        return ExitCode::from(reply.exit_code() as u8);
    }
    let args = Args::parse();
    init_logging();
    let etcd_tls = match client::etcd_tls(
        args.etcd_ca_file.clone(),
        args.etcd_cert_file.clone(),
        args.etcd_key_file.clone(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("torusblk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let peer = match client::peer_options(
        args.peer_transport.as_deref(),
        args.peer_cert_file.clone(),
        args.peer_key_file.clone(),
        args.peer_ca_file.clone(),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("torusblk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("torusblk: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match args.command {
        Cmd::Nbd {
            detach: Some(dev), ..
        } => match kernel::detach(&dev) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("torusblk: {e}");
                1
            }
        },
        Cmd::Nbd {
            volume,
            device,
            read_only,
            trim,
            server,
            ..
        } => {
            let server = match server.map(|s| s.parse::<std::net::SocketAddr>().map_err(|_| s)) {
                None => None,
                Some(Ok(a)) => Some(a),
                Some(Err(s)) => {
                    eprintln!("torusblk: --server {s:?} is not an address (IP:PORT)");
                    return ExitCode::FAILURE;
                }
            };
            let kind = match AttacherKind::from_env() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("torusblk: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let work_dir = std::env::temp_dir().join(format!("torusblk-{}", std::process::id()));
            let req = AttachRequest {
                volume: volume.unwrap_or_default(),
                etcd: args.etcd,
                etcd_tls: etcd_tls.clone(),
                peer: peer.clone(),
                kind,
                device,
                work_dir: work_dir.clone(),
                read_only,
                trim,
                server,
            };
            let code = runtime.block_on(attach::run(req));
            let _ = std::fs::remove_dir_all(work_dir);
            code
        }
        Cmd::AttachDaemon {
            volume,
            attacher,
            work_dir,
            read_only,
            trim,
        } => {
            torusblk::cgroup::escape_from_env();
            let kind = if attacher == "nbdfuse" {
                AttacherKind::Nbdfuse
            } else {
                AttacherKind::Kernel
            };
            runtime.block_on(attach::run(AttachRequest {
                volume,
                etcd: args.etcd,
                etcd_tls: etcd_tls.clone(),
                peer: peer.clone(),
                kind,
                device: None,
                work_dir,
                read_only,
                trim,
                server: None,
            }))
        }
        Cmd::Nbdserve { listen, read_only } => {
            match runtime.block_on(nbdserve(&args.etcd, etcd_tls, peer, &listen, read_only)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("torusblk: {e}");
                    1
                }
            }
        }
    };
    ExitCode::from(code as u8)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TORUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn flexvolume(argv: &[String]) -> Reply {
    match flex::parse_call(argv) {
        Err(reply) => reply,
        Ok(Call::Init) => Reply::init(),
        Ok(Call::Mount { dir, options }) => driver::mount(&dir, &options),
        Ok(Call::Unmount { dir }) => driver::unmount(&dir),
        Ok(Call::NotSupported(call)) => Reply::not_supported(flex::not_supported_reason(&call)),
    }
}

/// `torusblk nbdserve`: every volume of the cluster, served from a client-only node.
async fn nbdserve(
    etcd: &str,
    tls: Option<torus_backends::metadata::EtcdTls>,
    peer: client::PeerOptions,
    listen: &str,
    read_only: bool,
) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let addr = listen
        .parse()
        .map_err(|_| format!("--listen {listen:?} is not an address (IP:PORT)"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("signal handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("signal handler: {e}"))?;
    let mut opts = client::ClientOptions::new(etcd, tls);
    opts.peer = peer;
    let node = client::connect(&opts).await.map_err(|e| e.to_string())?;
    let server = match client::serve(Arc::new(node.clone()), addr, read_only).await {
        Ok(s) => s,
        Err(e) => {
            let _ = client::leave(node, &opts).await;
            return Err(format!("cannot listen for NBD on {listen}: {e}"));
        }
    };
    println!("torusblk nbdserve ready: nbd={} etcd={etcd}", server.addr);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    server.stop().await;
    client::leave(node, &opts)
        .await
        .map_err(|e| format!("shutting down: {e}"))
}
