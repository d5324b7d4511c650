//! The demo's in-process MQTT broker (rumqttd) on loopback.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Failed(format!("no free port on loopback: {e}")))
}

/// Starts an in-process MQTT broker on `127.0.0.1:port`.
pub fn start_broker(port: u16) -> Result<()> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&text)
        .map_err(|e| Error::Failed(format!("the demo broker's config: {e}")))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                log::error!("demo broker stopped: {e}");
            }
        })
        .map_err(|e| Error::Failed(format!("cannot start the demo broker: {e}")))?;
    // Wait until it accepts connections.
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(Error::Failed(format!(
                "the demo broker did not start on 127.0.0.1:{port}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
