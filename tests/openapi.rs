//! The OpenAPI document against the router: the spec lists exactly the operations of
//! `api::openapi::ROUTES`, and the router answers each of them and refuses other methods with a 405
//! whose `Allow` names the spec's methods for that path.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::TestDb;
use jobqueue::api::openapi::{ROUTES, SPEC};
use jobqueue::api::routes;
use serde_json::Value;

const METHODS: [&str; 8] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"];

fn spec_operations() -> BTreeSet<(String, String)> {
    let spec: Value = serde_json::from_str(SPEC).expect("openapi.json is JSON");
    assert_eq!(spec["openapi"], "3.1.0");
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            let upper = method.to_ascii_uppercase();
            assert!(METHODS.contains(&upper.as_str()), "{path}: {method} is not an HTTP method");
            ops.insert((upper, path.clone()));
        }
    }
    ops
}

#[test]
fn the_spec_lists_exactly_the_routes() {
    let routes: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(routes.len(), ROUTES.len(), "ROUTES has duplicates");
    let spec = spec_operations();
    let missing: Vec<_> = routes.difference(&spec).collect();
    let extra: Vec<_> = spec.difference(&routes).collect();
    assert!(missing.is_empty(), "routes missing from openapi.json: {missing:?}");
    assert!(extra.is_empty(), "operations in openapi.json that the router does not list: {extra:?}");
}

#[test]
fn every_reference_in_the_spec_resolves() {
    let spec: Value = serde_json::from_str(SPEC).unwrap();
    fn walk(v: &Value, spec: &Value, seen: &mut usize) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {r}"));
                    assert!(spec.pointer(pointer).is_some(), "dangling $ref {r}");
                    *seen += 1;
                }
                o.values().for_each(|x| walk(x, spec, seen));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, spec, seen)),
            _ => {}
        }
    }
    let mut seen = 0;
    walk(&spec, &spec, &mut seen);
    assert!(seen > 10, "expected the spec to use shared components, found {seen} references");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_every_route_of_the_spec_and_only_those_methods() {
    let db = TestDb::new().await;
    let api = routes(Arc::new(common::api_state(&db.url)));
    let mut by_path: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (m, p) in ROUTES {
        by_path.entry(p).or_default().insert(m);
    }
    let id = uuid::Uuid::new_v4().to_string();
    for (path, methods) in &by_path {
        let concrete = path.replace("{id}", &id);
        for method in METHODS.iter().filter(|m| **m != "HEAD") {
            let resp = warp::test::request()
                .method(method)
                .path(&concrete)
                .header("content-type", "application/json")
                .reply(&api)
                .await;
            let status = resp.status().as_u16();
            let body = String::from_utf8_lossy(resp.body()).to_string();
            if methods.contains(method) {
                assert_ne!(status, 405, "{method} {path}: {body}");
                assert!(!body.contains("no route for"), "{method} {path} is in the spec but not routed: {body}");
            } else {
                assert_eq!(status, 405, "{method} {path} is routed but not in the spec: {body}");
                let allow: BTreeSet<&str> = resp.headers()["allow"].to_str().unwrap().split(", ").collect();
                assert_eq!(&allow, methods, "{path}: Allow disagrees with the spec");
            }
        }
    }
    let resp = warp::test::request().path("/openapi.json").reply(&api).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.body().as_ref(), SPEC.as_bytes());
}
