//! The fleet's certificates, made with `rcgen` (the only module that knows it; nothing shells
//! out to openssl). Keys are ECDSA P-256 in PKCS#8 PEM, written 0600; certificates 0644.
//!
//! `DIR/` after [`init`]: `ca.pem` + `ca.key` (the fleet CA), `hub.pem` + `hub.key` (the
//! hub's client certificate, CN [`HUB_IDENTITY`]), `broker.pem` + `broker.key` (the broker's
//! server certificate: SAN `localhost`, `127.0.0.1` and each extra host). [`init`] refuses
//! to touch a folder that already holds any of them.
//!
//! Signing later ([`Ca::load`]): the issuer is rebuilt from `ca.key` and the CA's fixed
//! distinguished name ([`CA_NAME`]); the authority key identifier comes from the key, so
//! the certificates it signs chain to `ca.pem` (the tests check with `openssl verify`).
//! Choice: rcgen's default validity (1975 to 4096); rotation and revocation come later.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{HUB_IDENTITY, HubError, Result, make_dir, read_small, refuse_existing, write_new};

/// The CA's common name (and the issuer name of every certificate it signs).
pub const CA_NAME: &str = "Outpost fleet CA";
const ORGANIZATION: &str = "Outpost";
/// Largest certificate or key file read.
const MAX_PEM: u64 = 64 * 1024;

fn pki_err(e: rcgen::Error) -> HubError {
    HubError::Pki(e.to_string())
}

/// The files of a PKI folder.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub dir: PathBuf,
}

impl PkiPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn hub_cert(&self) -> PathBuf {
        self.dir.join("hub.pem")
    }
    pub fn hub_key(&self) -> PathBuf {
        self.dir.join("hub.key")
    }
    pub fn broker_cert(&self) -> PathBuf {
        self.dir.join("broker.pem")
    }
    pub fn broker_key(&self) -> PathBuf {
        self.dir.join("broker.key")
    }
}

fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A certificate and its key, as PEM.
#[derive(Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `<cert>` (0644) and `<key>` (0600), refusing to replace either.
    pub fn write(&self, cert: &Path, key: &Path) -> Result<()> {
        write_new(key, self.key_pem.as_bytes(), 0o600)?;
        write_new(cert, self.cert_pem.as_bytes(), 0o644)
    }
}

/// The fleet CA, able to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl Ca {
    /// A new CA with a fresh key.
    fn generate() -> Result<(Ca, String)> {
        let key = KeyPair::generate().map_err(pki_err)?;
        let params = ca_params()?;
        let cert = params.self_signed(&key).map_err(pki_err)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok((
            Ca {
                issuer: Issuer::new(params, key),
                cert_pem,
            },
            key_pem,
        ))
    }

    /// The CA of a folder made by [`init`]: `ca.key` and `ca.pem`.
    pub fn load(pki: &PkiPaths) -> Result<Ca> {
        let key_path = pki.ca_key();
        let key = KeyPair::from_pem(&read_small("CA key", &key_path, MAX_PEM)?).map_err(|e| {
            HubError::BadFile {
                what: "CA key",
                path: key_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let cert_path = pki.ca_cert();
        let cert_pem = read_small("CA certificate", &cert_path, MAX_PEM)?;
        if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(HubError::BadFile {
                what: "CA certificate",
                path: cert_path,
                reason: "no PEM certificate in it".into(),
            });
        }
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, key),
            cert_pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf(&self, cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose) -> Result<Issued> {
        let key = KeyPair::generate().map_err(pki_err)?;
        let mut params = CertificateParams::new(sans).map_err(pki_err)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate whose CN is `cn` (a device id, or the hub's identity).
    pub fn client(&self, cn: &str) -> Result<Issued> {
        self.leaf(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// The broker's server certificate for `localhost`, `127.0.0.1` and `hosts`.
    pub fn server(&self, hosts: &[String]) -> Result<Issued> {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        for h in hosts {
            if !sans.contains(h) {
                sans.push(h.clone());
            }
        }
        let cn = hosts.first().map_or("localhost", String::as_str);
        self.leaf(cn, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }
}

/// `pki init`: a new CA, the hub's client certificate and the broker's server certificate
/// in `dir` (created if missing). Refuses if any of the six files exists.
pub fn init(dir: &Path, broker_hosts: &[String]) -> Result<PkiPaths> {
    for h in broker_hosts {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
        if !ok {
            return Err(HubError::Pki(format!(
                "--broker-host {:?} is not a host name or IP address",
                h.chars().take(80).collect::<String>()
            )));
        }
    }
    let pki = PkiPaths::new(&make_dir(dir)?);
    refuse_existing(&[
        pki.ca_cert(),
        pki.ca_key(),
        pki.hub_cert(),
        pki.hub_key(),
        pki.broker_cert(),
        pki.broker_key(),
    ])?;
    let (ca, ca_key) = Ca::generate()?;
    let hub = ca.client(HUB_IDENTITY)?;
    let broker = ca.server(broker_hosts)?;
    // The CA key first: a second init then stops at it, whatever else happened.
    write_new(&pki.ca_key(), ca_key.as_bytes(), 0o600)?;
    write_new(&pki.ca_cert(), ca.cert_pem.as_bytes(), 0o644)?;
    hub.write(&pki.hub_cert(), &pki.hub_key())?;
    broker.write(&pki.broker_cert(), &pki.broker_key())?;
    Ok(pki)
}
