//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` describe it, with rustls.
//!
//! tokio-postgres itself knows `sslmode=disable|prefer|require` and refuses the rest of libpq's
//! vocabulary, so [`TlsSettings::from_url`] takes `sslmode` and `sslrootcert` out of the URL and
//! decides how certificates are checked; tokio-postgres is told only whether TLS is required.
//!
//! | sslmode     | encrypted            | server certificate checked                       |
//! |-------------|----------------------|--------------------------------------------------|
//! | disable     | no                   | -                                                |
//! | prefer      | if the server can    | no (as libpq)                                    |
//! | require     | yes                  | no; with `sslrootcert`, the chain (as libpq)     |
//! | verify-ca   | yes                  | chain to `sslrootcert` or the platform's roots   |
//! | verify-full | yes                  | chain, and the host name in the URL              |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::DbError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, DbError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            // libpq's "allow" tries without TLS first; for a client that never needs the downgrade,
            // preferring TLS is the safer reading.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(DbError::Url(format!(
                    "sslmode={other:?}: expected disable, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it is required.
    fn for_driver(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// Parses a database URL as jobqueue reads it (libpq's TLS parameters included), without opening
/// anything or reading certificates: for validating configuration.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, TlsSettings), DbError> {
    let (driver_url, tls) = TlsSettings::from_url(url)?;
    let config = driver_url.parse::<tokio_postgres::Config>().map_err(|e| DbError::Url(e.to_string()))?;
    Ok((config, tls))
}

/// The TLS part of a database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

impl TlsSettings {
    /// Splits `url` into what tokio-postgres understands and the TLS settings. Both URL
    /// (`postgres://...?sslmode=verify-full`) and key=value (`host=... sslmode=...`) forms work.
    /// Without `sslmode`, libpq's default, `prefer`, applies.
    pub fn from_url(url: &str) -> Result<(String, TlsSettings), DbError> {
        let mut mode = None;
        let mut root_cert = None;
        let driver_url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (base, query) = url.split_once('?').unwrap_or((url, ""));
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(query).map_err(|e| DbError::Url(format!("query string: {e}")))?;
            let mut kept = Vec::new();
            for (k, v) in pairs {
                match k.as_str() {
                    "sslmode" => mode = Some(SslMode::parse(&v)?),
                    "sslrootcert" => root_cert = Some(PathBuf::from(v)),
                    _ => kept.push((k, v)),
                }
            }
            let mode = mode.unwrap_or(SslMode::Prefer);
            kept.push(("sslmode".into(), mode.for_driver().into()));
            let query = serde_urlencoded::to_string(&kept).map_err(|e| DbError::Url(e.to_string()))?;
            format!("{base}?{query}")
        } else {
            let mut kept = Vec::new();
            for token in url.split_whitespace() {
                match token.split_once('=') {
                    Some(("sslmode", v)) => mode = Some(SslMode::parse(v.trim_matches('\''))?),
                    Some(("sslrootcert", v)) => root_cert = Some(PathBuf::from(v.trim_matches('\''))),
                    _ => kept.push(token.to_string()),
                }
            }
            kept.push(format!("sslmode={}", mode.unwrap_or(SslMode::Prefer).for_driver()));
            kept.join(" ")
        };
        Ok((driver_url, TlsSettings { mode: mode.unwrap_or(SslMode::Prefer), root_cert }))
    }

    /// The connector every connection of a [`super::Connector`] uses.
    pub fn connector(&self) -> Result<MakeRustlsConnect, DbError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| DbError::Tls(e.to_string()))?;
        let verify_chain = match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            // libpq: with a root certificate given, require checks the chain too.
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        };
        let config = if !verify_chain {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(Unverified(provider))).with_no_client_auth()
        } else {
            let roots = Arc::new(self.roots()?);
            if self.mode == SslMode::VerifyFull {
                builder.with_root_certificates(roots).with_no_client_auth()
            } else {
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| DbError::Tls(e.to_string()))?;
                builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(webpki))).with_no_client_auth()
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// `sslrootcert` if given, else the platform's root certificates.
    fn roots(&self) -> Result<RootCertStore, DbError> {
        let mut roots = RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = match &self.root_cert {
            Some(path) => read_pem(path)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    return Err(DbError::Tls(format!(
                        "no root certificates found on this system ({:?}); give one with sslrootcert",
                        found.errors
                    )));
                }
                found.certs
            }
        };
        let (_added, _ignored) = roots.add_parsable_certificates(certs);
        if roots.is_empty() {
            return Err(DbError::Tls("no usable root certificate".into()));
        }
        Ok(roots)
    }
}

fn read_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, DbError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| DbError::Tls(format!("sslrootcert={}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(DbError::Tls(format!("sslrootcert={}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encrypted, but any certificate is accepted,
/// as libpq does. The handshake's signatures are still checked against the certificate presented.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_settings_are_taken_out_of_the_url() {
        let (url, tls) = TlsSettings::from_url(
            "postgres://u@db:5432/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(tls, TlsSettings { mode: SslMode::VerifyFull, root_cert: Some("/tmp/ca.pem".into()) });
        assert_eq!(url, "postgres://u@db:5432/app?application_name=x&sslmode=require");
        url.parse::<tokio_postgres::Config>().expect("tokio-postgres accepts what is left");

        let (url, tls) = TlsSettings::from_url("postgres://u@db/app").unwrap();
        assert_eq!(tls.mode, SslMode::Prefer);
        assert_eq!(url, "postgres://u@db/app?sslmode=prefer");

        let (url, tls) = TlsSettings::from_url("host=db user=u sslmode=verify-ca sslrootcert=/ca.pem").unwrap();
        assert_eq!(tls, TlsSettings { mode: SslMode::VerifyCa, root_cert: Some("/ca.pem".into()) });
        assert_eq!(url, "host=db user=u sslmode=require");

        assert!(TlsSettings::from_url("postgres://db/app?sslmode=sometimes").is_err());
    }
}
