//! Real handshakes over loopback: a pinned client admits exactly the pinned key, a CA file
//! admits certificates it signed for the name dialled, the system roots refuse a
//! self-signed server and name the key it presented, and a reload changes what new
//! connections see.

use mint_tls::{ClientTrust, Incoming, Pin, ServerCert, ServerSource, Trust};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mint-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Serves one byte echo per connection, forever.
async fn serve(cert: &ServerCert) -> std::net::SocketAddr {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut incoming = Incoming::tls(tcp, cert.acceptor()).unwrap();
    let addr = axum::serve::Listener::local_addr(&incoming).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = axum::serve::Listener::accept(&mut incoming).await;
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn talk(
    addr: std::net::SocketAddr,
    trust: &ClientTrust,
    name: &str,
) -> Result<Option<Pin>, (String, Option<Pin>)> {
    let (config, presented) = trust.watched();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(name.to_string()).unwrap();
    match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        connector.connect(name, tcp),
    )
    .await
    .expect("handshake within 10 s")
    {
        Ok(mut s) => {
            s.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"x");
            Ok(presented.pin())
        }
        Err(e) => Err((e.to_string(), presented.pin())),
    }
}

#[tokio::test]
async fn clients_admit_only_what_they_trust() {
    let dir = scratch("trust");
    let cert = ServerCert::load(ServerSource::SelfSigned {
        dir: dir.clone(),
        names: vec![],
    })
    .unwrap();
    let addr = serve(&cert).await;
    let pin = cert.pin();

    let pinned = ClientTrust::new(&Trust::Pin(pin)).unwrap();
    assert_eq!(
        talk(addr, &pinned, "anything.invalid").await.unwrap(),
        Some(pin),
        "a pin ignores names"
    );

    let wrong: Pin = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    let (e, seen) = talk(
        addr,
        &ClientTrust::new(&Trust::Pin(wrong)).unwrap(),
        "localhost",
    )
    .await
    .unwrap_err();
    assert!(
        e.contains(&pin.to_string()) && e.contains(&wrong.to_string()),
        "{e}"
    );
    assert_eq!(seen, Some(pin));

    // The self-signed certificate as a CA: admitted for a name it carries, not another.
    let ca = ClientTrust::new(&Trust::Ca(dir.join("cert.pem"))).unwrap();
    talk(addr, &ca, "localhost").await.unwrap();
    assert!(talk(addr, &ca, "other.example").await.is_err());

    if let Ok(system) = ClientTrust::new(&Trust::System) {
        let (_, seen) = talk(addr, &system, "localhost").await.unwrap_err();
        assert_eq!(seen, Some(pin), "a refusal still reports the key presented");
    }
    talk(
        addr,
        &ClientTrust::new(&Trust::Insecure).unwrap(),
        "localhost",
    )
    .await
    .unwrap();

    let e = ClientTrust::new(&Trust::Ca(dir.join("missing.pem")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_to_new_connections() {
    let dir = scratch("reload");
    let cert = ServerCert::load(ServerSource::SelfSigned {
        dir: dir.clone(),
        names: vec![],
    })
    .unwrap();
    let addr = serve(&cert).await;
    let first = cert.pin();
    let insecure = ClientTrust::new(&Trust::Insecure).unwrap();
    assert_eq!(
        talk(addr, &insecure, "localhost").await.unwrap(),
        Some(first)
    );
    // A new pair in the same place, as an operator's renewal would leave it.
    std::fs::remove_file(dir.join("cert.pem")).unwrap();
    std::fs::remove_file(dir.join("key.pem")).unwrap();
    let second = cert.reload().unwrap();
    assert_ne!(first, second);
    assert_eq!(
        talk(addr, &insecure, "localhost").await.unwrap(),
        Some(second)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
