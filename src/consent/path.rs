//! The consent resource's path, `/voicebiometrics/contacts/{contact_id}/consent`: Talkdesk's
//! shape, which the proxy serves as it is.

const PREFIX: &str = "/voicebiometrics/contacts/";
const SUFFIX: &str = "/consent";

/// The raw `{contact_id}` segment when `path` is exactly a consent path.
pub fn consent_path_segment(path: &str) -> Option<&str> {
    let segment = path.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    (!segment.is_empty() && !segment.contains('/')).then_some(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

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
