//! A driver that fetches the node's `agent-url` property over `wasi:http` on deploy and
//! reports the body, to check that outbound requests reach granted hosts only.
use mint_sdk::driver::{Deployment, Driver, InstanceState, Node, StatusReport};
use mint_sdk::{Config, Error};
use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, Method, OutgoingRequest, Scheme};

fn get(url: &str) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or("url needs a scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let req = OutgoingRequest::new(Fields::new());
    req.set_method(&Method::Get).map_err(|_| "method")?;
    req.set_scheme(Some(&if scheme == "https" { Scheme::Https } else { Scheme::Http })).map_err(|_| "scheme")?;
    req.set_authority(Some(authority)).map_err(|_| "authority")?;
    req.set_path_with_query(Some(path)).map_err(|_| "path")?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let resp = pending
        .get()
        .ok_or("no response")?
        .map_err(|_| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let body = resp.consume().map_err(|_| "body")?;
    let stream = body.stream().map_err(|_| "stream")?;
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => out.extend(chunk),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

struct Http;
impl Driver for Http {
    fn deploy(node: &Node, _: &Deployment, _: &Config) -> Result<StatusReport, Error> {
        let url = node.require_property("agent-url")?;
        let body = get(url).map_err(|e| Error::external(format!("GET {url}: {e}")))?;
        Ok(StatusReport::new(InstanceState::Running, body))
    }
    fn undeploy(_: &Node, _: &Deployment, _: &Config) -> Result<(), Error> {
        Ok(())
    }
    fn status(_: &Node, _: &Deployment, _: &Config) -> Result<StatusReport, Error> {
        Ok(StatusReport::new(InstanceState::Absent, ""))
    }
}
mint_sdk::export_driver!(Http);
