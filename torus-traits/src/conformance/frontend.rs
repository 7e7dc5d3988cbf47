//! Conformance suite for [`Frontend`]: lifecycle only. What a frontend says
//! on the wire is checked by its own protocol tests and by real clients.
//!
//! The frontend must have been bound to a loopback TCP address already.

use crate::Frontend;
use std::sync::Arc;
use std::time::Duration;

/// It reports its address, accepts connections while serving, stops within
/// 10 s of the shutdown signal, and no longer accepts afterwards.
pub async fn serves_until_shutdown(frontend: Arc<dyn Frontend>) {
    assert!(
        !frontend.name().is_empty(),
        "a frontend needs a name for logs"
    );
    let addr = frontend
        .local_addr()
        .expect("a bound frontend reports its address");
    assert_ne!(addr.port(), 0, "local_addr must report the real port");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let f = frontend.clone();
    let task = tokio::spawn(async move { f.serve(rx).await });
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("connecting must not hang")
    .expect("a serving frontend accepts connections");
    stop.send(true).expect("signal");
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve must return within 10 s of shutdown, even with a client connected")
        .expect("serve task must not panic");
    assert!(
        result.is_ok(),
        "serve returned an error on shutdown: {result:?}"
    );
    drop(conn);
    let again =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await;
    assert!(
        !matches!(again, Ok(Ok(_))),
        "a stopped frontend must not accept new connections"
    );
}

/// Run every function of the suite.
pub async fn all(frontend: Arc<dyn Frontend>) {
    serves_until_shutdown(frontend).await;
}
