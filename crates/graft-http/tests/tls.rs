//! The router served over TLS: a round trip with a self-signed certificate
//! made here (rcgen), pinned by the client; a client that does not trust it
//! gets no answer; and the peer address reaches the rate limit.

mod support;

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use support::Api;

struct Files {
    dir: std::path::PathBuf,
    cert_pem: String,
}

fn self_signed(name: &str) -> Files {
    let dir = std::env::temp_dir().join(format!("graft-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    Files {
        dir,
        cert_pem: cert.pem(),
    }
}

fn client(
    trusted: Option<&str>,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = trusted {
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

#[tokio::test]
async fn a_self_signed_node_answers_a_client_that_pins_its_certificate() {
    let files = self_signed("roundtrip");
    let config =
        graft_http::tls::server_config(&files.dir.join("cert.pem"), &files.dir.join("key.pem"))
            .unwrap();
    let api = Api::new();
    let app = graft_http::router(api.node.clone(), api.trust.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(graft_http::tls::serve(listener, app, config, async {
        let _ = stop_rx.await;
    }));
    let url = format!("https://localhost:{port}/api/v1/sandboxes");
    let req = |token: Option<&str>| {
        let mut r = hyper::Request::get(&url);
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    let pinned = client(Some(&files.cert_pem));
    let resp = pinned.request(req(Some(&api.admin))).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"[]");
    let resp = pinned.request(req(None)).await.unwrap();
    assert_eq!(resp.status(), 401);
    // A client that does not trust the certificate gets no answer at all.
    assert!(client(None).request(req(Some(&api.admin))).await.is_err());
    // Plain http to the TLS port gets nothing either.
    let plain: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let r = hyper::Request::get(format!("http://127.0.0.1:{port}/api/v1/health"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(plain
        .request(r)
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true));
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&files.dir);
}

#[test]
fn bad_certificate_files_are_clear_errors() {
    let files = self_signed("bad");
    let missing =
        graft_http::tls::server_config(&files.dir.join("nope.pem"), &files.dir.join("key.pem"))
            .unwrap_err();
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    let swapped =
        graft_http::tls::server_config(&files.dir.join("key.pem"), &files.dir.join("cert.pem"))
            .unwrap_err();
    assert!(swapped.to_string().contains("key.pem"), "{swapped}");
    let _ = std::fs::remove_dir_all(&files.dir);
}
