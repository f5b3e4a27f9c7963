//! The consent resource's path, `/voicebiometrics/contacts/{contact_id}/consent`: Talkdesk's
//! shape, which the proxy serves as it is.

use super::ContactId;

const PREFIX: &str = "/voicebiometrics/contacts/";
const SUFFIX: &str = "/consent";
/// The path as a template, for traces (`http.route`, `url.template`): never the contact id.
pub const CONSENT_ROUTE: &str = "/voicebiometrics/contacts/{contact_id}/consent";

/// The consent path of `contact`, its id percent-encoded for a path (as sent upstream).
pub fn consent_path(contact: &ContactId) -> String {
    consent_url("", contact)
}

/// `base` followed by the consent path of `contact`, built in one allocation (a miss builds
/// one per upstream call).
pub fn consent_url(base: &str, contact: &ContactId) -> String {
    let segment = contact.path_segment();
    let mut url = String::with_capacity(
        base.len() + PREFIX.len() + segment.clone().map(str::len).sum::<usize>() + SUFFIX.len(),
    );
    url.push_str(base);
    url.push_str(PREFIX);
    url.extend(segment);
    url.push_str(SUFFIX);
    url
}

/// The raw `{contact_id}` segment when `path` is exactly a consent path.
pub fn consent_path_segment(path: &str) -> Option<&str> {
    let segment = path.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    (!segment.is_empty() && !segment.contains('/')).then_some(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contacts_path_round_trips() {
        let contact = ContactId::from_path_segment("+15551234567").unwrap();
        let path = consent_path(&contact);
        assert_eq!(path, "/voicebiometrics/contacts/%2B15551234567/consent");
        let segment = consent_path_segment(&path).unwrap();
        assert_eq!(ContactId::from_path_segment(segment), Some(contact));
    }

    #[test]
    fn paths_match_exactly() {
        assert_eq!(
            consent_path_segment("/voicebiometrics/contacts/%2B1555/consent"),
            Some("%2B1555")
        );
        for path in [
            "/voicebiometrics/contacts//consent",
            "/voicebiometrics/contacts/a/b/consent",
            "/voicebiometrics/contacts/a/consent/",
            "//voicebiometrics/contacts/a/consent",
            "/voicebiometrics/contacts/a/enrollment",
            "/",
        ] {
            assert_eq!(consent_path_segment(path), None, "{path}");
        }
    }
}
