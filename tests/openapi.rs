//! `GET /v1/openapi.json` against a real daemon: the document is OpenAPI 3.1 and valid by
//! its schema (openapi-spec-validator), every route the router serves is in it, and real
//! answers of a run validate against the schemas it gives them, with no field it does not
//! describe.

use crate::running::Daemon;
use crate::support::{admin_auth, root, scratch};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::process::Command;

/// The routes a router in `file` serves, as (METHOD, path template), read from its
/// `.route("PATH", get(...).post(...))` calls inside the function `function`. HEAD is the
/// GET of the same route and is not listed apart.
fn routes_in(file: &str, function: &str) -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(root().join(file)).unwrap();
    let start = text
        .find(&format!("fn {function}("))
        .unwrap_or_else(|| panic!("{file} has no fn {function}"));
    let body = &text[start..];
    let end = body[1..]
        .find("\nfn ")
        .or_else(|| body[1..].find("\npub fn "))
        .map_or(body.len(), |e| e + 1);
    let body = &body[..end];
    let mut out = BTreeSet::new();
    for piece in body.split(".route(").skip(1) {
        let path = piece
            .split('"')
            .nth(1)
            .expect("a route's path literal")
            .to_string();
        // The route's methods are named up to the end of this `.route(...)` call.
        let mut depth = 1;
        let mut call = String::new();
        for c in piece.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                break;
            }
            call.push(c);
        }
        for method in ["get", "post", "put", "patch", "delete"] {
            let named = call.contains(&format!("{method}(")) && {
                // `get(`, `.get(`, `routing::delete(`: a method call, not a word inside one.
                call.match_indices(&format!("{method}(")).any(|(i, _)| {
                    i == 0
                        || !call.as_bytes()[i - 1].is_ascii_alphanumeric()
                            && call.as_bytes()[i - 1] != b'_'
                })
            };
            if named {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    assert!(!out.is_empty(), "{file}: no routes read in fn {function}");
    out
}

/// Checks the document and answers with the Python tools `cargo xtask setup` installs.
const CHECK: &str = r#"
import json, sys
from openapi_spec_validator import validate
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

doc = json.load(open(sys.argv[1]))
validate(doc)

def strict(node):
    # Every object the document describes with properties has no others: an answer with a
    # field the document does not name fails.
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)

strict(doc)
registry = Registry().with_resource("urn:mint-api", Resource.from_contents(doc, default_specification=DRAFT202012))
failures = []
samples = json.load(open(sys.argv[2]))
for s in samples:
    pointer = "/paths/" + s["path"].replace("~", "~0").replace("/", "~1") + "/" + s["method"].lower() + "/responses/" + str(s["status"]) + "/content/application~1json/schema"
    try:
        op = doc["paths"][s["path"]][s["method"].lower()]
        op["responses"][str(s["status"])]["content"]["application/json"]["schema"]
    except KeyError:
        failures.append(f"{s['method']} {s['path']} {s['status']}: the document gives no JSON schema for this answer")
        continue
    v = Draft202012Validator({"$ref": "urn:mint-api#" + pointer}, registry=registry)
    for e in v.iter_errors(s["body"]):
        failures.append(f"{s['method']} {s['path']} {s['status']}: {e.message} at {list(e.absolute_path)}")
print(f"{len(samples)} answers checked")
if failures:
    print("\n".join(failures))
    sys.exit(1)
"#;

#[test]
fn the_document_covers_every_route_and_real_answers_validate_against_it() {
    let dir = scratch("openapi");
    let d = Daemon::start(&dir.join("data"), &[], &root());
    let base = &d.url;
    let auth = admin_auth(&d.data);

    // Open, as the health check is: it holds no secret and tools read it first.
    let doc: Value = ureq::get(&format!("{base}/v1/openapi.json"))
        .call()
        .expect("the document")
        .into_json()
        .unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    // Every route of the API's router and of the boot routes it serves is documented.
    let mut routes = routes_in("engine/daemon/src/lib.rs", "router");
    routes.extend(routes_in("engine/daemon/src/netboot.rs", "boot_routes"));
    let mut missing = Vec::new();
    for (method, path) in &routes {
        if doc["paths"][path][method.to_lowercase()].is_null() {
            missing.push(format!("{method} {path}"));
        }
    }
    assert!(missing.is_empty(), "routes the document lacks: {missing:?}");
    assert!(routes.len() >= 40, "the routes were read: {routes:?}");
    // And it documents nothing the router does not serve.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if method == "parameters" {
                continue;
            }
            assert!(
                routes.contains(&(method.to_uppercase(), path.clone())),
                "the document names {method} {path}, which no route serves"
            );
        }
    }

    // A run: real answers, each kept with the route template it answers.
    let mut samples = Vec::new();
    let mut call = |method: &str, template: &str, path: &str, body: Option<Value>| -> Value {
        let r = ureq::request(method, &format!("{base}{path}")).set("Authorization", &auth);
        let answer = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        let (status, v): (u16, Value) = match answer {
            Ok(resp) => (resp.status(), resp.into_json().unwrap()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_json().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        };
        samples.push(json!({"method": method, "path": template, "status": status, "body": v}));
        v
    };
    let fixture = root().join("tests/fixtures/master-ifupdown");
    call(
        "POST",
        "/v1/images",
        "/v1/images",
        Some(json!({"path": fixture, "name": "debian"})),
    );
    let spec: toml::Value = toml::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/web-tier.toml")).unwrap(),
    )
    .unwrap();
    call(
        "POST",
        "/v1/tiers",
        "/v1/tiers",
        Some(serde_json::to_value(spec).unwrap()),
    );
    for n in 1..=4 {
        call(
            "POST",
            "/v1/nodes",
            "/v1/nodes",
            Some(
                json!({"name": format!("n{n}"), "cpus": 4, "memory-mib": 8192, "labels": {"zone": format!("z{n}")}}),
            ),
        );
    }
    call(
        "POST",
        "/v1/tiers/{name}/scale",
        "/v1/tiers/web/scale",
        Some(json!({"instances": 2})),
    );
    d.wait_for("two deployed", std::time::Duration::from_secs(60), || {
        (d.instances("web")
            .iter()
            .filter(|i| i["state"] == "deployed")
            .count()
            == 2)
            .then_some(())
    });
    call("GET", "/v1/health", "/v1/health", None);
    call("GET", "/v1/images", "/v1/images", None);
    call("GET", "/v1/images/{id}", "/v1/images/debian", None);
    call("GET", "/v1/images/{id}", "/v1/images/nosuch", None);
    call("GET", "/v1/tiers", "/v1/tiers", None);
    call("GET", "/v1/tiers/{name}", "/v1/tiers/web", None);
    call("GET", "/v1/tiers/{name}", "/v1/tiers/nosuch", None);
    call(
        "GET",
        "/v1/tiers/{name}/instances",
        "/v1/tiers/web/instances",
        None,
    );
    call(
        "POST",
        "/v1/tiers/{name}/scale",
        "/v1/tiers/web/scale",
        Some(json!({"instances": -1})),
    );
    call("GET", "/v1/nodes", "/v1/nodes", None);
    call(
        "POST",
        "/v1/nodes/{name}/state",
        "/v1/nodes/n4/state",
        Some(json!({"state": "maintenance"})),
    );
    call("DELETE", "/v1/nodes/{name}", "/v1/nodes/n4", None);
    call("GET", "/v1/events", "/v1/events?limit=50", None);
    call(
        "POST",
        "/v1/tokens",
        "/v1/tokens",
        Some(json!({"name": "ci", "role": "read-only"})),
    );
    call("GET", "/v1/tokens", "/v1/tokens", None);
    call("DELETE", "/v1/tokens/{name}", "/v1/tokens/ci", None);
    call("GET", "/v1/plugins", "/v1/plugins", None);
    call("GET", "/v1/plugins/{name}", "/v1/plugins/spread", None);
    call(
        "GET",
        "/v1/artifacts/{tier}/{index}",
        "/v1/artifacts/web/0",
        None,
    );
    call("GET", "/v1/blobs", "/v1/blobs", None);
    call(
        "POST",
        "/v1/images/gc",
        "/v1/images/gc",
        Some(json!({"keep-masters": true})),
    );
    let enrolled = call(
        "POST",
        "/v1/nodes/{name}/enroll",
        "/v1/nodes/agent-1/enroll",
        Some(json!({"labels": {"rack": "r1"}, "ttl-secs": 600})),
    );
    // The agent's side: it registers with the join token and heartbeats with what it got.
    let join_token = enrolled["join-token"].as_str().expect("a join token");
    let registered: Value = ureq::post(&format!("{base}/v1/agents/register"))
        .set("Authorization", &format!("Bearer {join_token}"))
        .send_json(json!({"name": "agent-1", "cpus": 4, "memory-mib": 8192, "arch": "x86_64", "agent-url": "http://127.0.0.1:9"}))
        .expect("register")
        .into_json()
        .unwrap();
    samples.push(
        json!({"method": "POST", "path": "/v1/agents/register", "status": 200, "body": registered}),
    );
    let credential = registered["credential"]
        .as_str()
        .expect("a credential")
        .to_string();
    let beat = ureq::post(&format!("{base}/v1/nodes/agent-1/heartbeat"))
        .set("Authorization", &format!("Bearer {credential}"))
        .send_json(json!({"load": 5}))
        .unwrap();
    samples.push(json!({"method": "POST", "path": "/v1/nodes/{name}/heartbeat", "status": 200, "body": beat.into_json::<Value>().unwrap()}));

    let samples_file = dir.join("samples.json");
    std::fs::write(&samples_file, serde_json::to_vec(&samples).unwrap()).unwrap();
    let doc_file = dir.join("openapi.json");
    std::fs::write(&doc_file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let script = dir.join("check.py");
    std::fs::write(&script, CHECK).unwrap();
    let python = crate::bmc::python_env(&root()).join("bin/python");
    let o = Command::new(&python)
        .arg(&script)
        .arg(&doc_file)
        .arg(&samples_file)
        .output()
        .expect("the test environment's Python");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains(&format!("{} answers checked", samples.len())),
        "{said}"
    );
}
