//! The daemon's certificate: loaded (or made, self-signed, at first start) before it
//! serves, its pin written beside the admin token for operators to hand to agents and the
//! CLI, and reloaded on SIGHUP.

use mint_tls::{ServerCert, ServerSource};
use std::net::SocketAddr;
use std::path::Path;

/// The file, in the data directory, holding the served certificate's pin.
pub const PIN_FILE: &str = "server.pin";

/// Loads the certificate `source` names. A self-signed one is made for the names the
/// daemon is reached by: the bound address when it is a specific one, and the advertised
/// URL's host.
pub(crate) fn start(
    data_dir: &Path,
    source: ServerSource,
    bound: SocketAddr,
    advertise: Option<&str>,
) -> Result<ServerCert, String> {
    let source = match source {
        ServerSource::SelfSigned { dir, mut names } => {
            if !bound.ip().is_unspecified() {
                names.push(bound.ip().to_string());
            }
            if let Some(host) = advertise
                .and_then(|a| a.split("://").nth(1))
                .and_then(|r| r.split('/').next())
            {
                let host = host
                    .rsplit_once(':')
                    .map(|(h, _)| h)
                    .unwrap_or(host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                names.push(host.to_string());
            }
            ServerSource::SelfSigned { dir, names }
        }
        files => files,
    };
    let cert = ServerCert::load(source).map_err(|e| format!("TLS: {e}"))?;
    write_pin(data_dir, &cert)?;
    tracing::info!(pin = %cert.pin(), "TLS certificate loaded");
    Ok(cert)
}

fn write_pin(data_dir: &Path, cert: &ServerCert) -> Result<(), String> {
    let path = data_dir.join(PIN_FILE);
    std::fs::write(&path, format!("{}\n", cert.pin()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads the certificate again (SIGHUP). On an error the one in use stays.
pub(crate) fn reload(app: &crate::Shared, cert: &ServerCert) {
    match cert
        .reload()
        .map_err(|e| e.to_string())
        .and_then(|pin| write_pin(&app.data_dir, cert).map(|_| pin))
    {
        Ok(pin) => {
            app.engine.plugins.runtime().set_engine_pin(Some(pin));
            app.delivery.set_engine_pin(Some(pin.to_string()));
            let _ = app.engine.store.note(
                "certificate-reloaded",
                format!("TLS certificate reloaded; its key is {pin}"),
                serde_json::json!({ "pin": pin.to_string() }),
                mint_model::records::ENGINE,
            );
        }
        Err(e) => tracing::error!("SIGHUP: keeping the certificate in use: {e}"),
    }
}
