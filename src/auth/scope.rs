//! OAuth scopes and the permissions they stand for: `voicebiometrics-consent:read` = `read`,
//! `voicebiometrics-consent:write` = `write` (Talkdesk's own scope names, so an integration's
//! scope setting carries over). No scope grants `admin`: the admin listener takes keys only.

use crate::config::Permissions;
use crate::consent::{READ_SCOPE, WRITE_SCOPE};

/// Why a requested scope cannot be granted (RFC 6749 `invalid_scope`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("unknown scope '{0}'")]
    Unknown(String),
    #[error("this client may not be granted '{0}'")]
    NotHeld(&'static str),
    #[error("this client holds no consent permission to grant")]
    NothingToGrant,
}

/// The permissions a scope string names. Unknown scopes are an error.
fn parse(scope: &str) -> Result<Permissions, ScopeError> {
    let mut permissions = Permissions::default();
    // RFC 6749 §3.3: space-delimited; extra spaces are tolerated, not other whitespace.
    for name in scope.split(' ').filter(|s| !s.is_empty()) {
        if !add(&mut permissions, name) {
            return Err(ScopeError::Unknown(name.to_owned()));
        }
    }
    Ok(permissions)
}

/// Adds the permission scope `name` stands for; false for an unknown name.
fn add(permissions: &mut Permissions, name: &str) -> bool {
    match name {
        READ_SCOPE => permissions.read = true,
        WRITE_SCOPE => permissions.write = true,
        _ => return false,
    }
    true
}

/// The permissions a token may name, given the `scope` the client asked for (absent or blank:
/// every consent permission it holds) and what it holds. Asking for more than it holds is an
/// error, not a silent narrowing, so a misconfigured integration finds out at once.
pub fn to_grant(requested: Option<&str>, held: Permissions) -> Result<Permissions, ScopeError> {
    let consent_held = Permissions {
        admin: false,
        ..held
    };
    match requested.filter(|s| !s.trim().is_empty()) {
        None if consent_held == Permissions::default() => Err(ScopeError::NothingToGrant),
        None => Ok(consent_held),
        Some(scope) => {
            let wanted = parse(scope)?;
            if wanted.read && !held.read {
                return Err(ScopeError::NotHeld(READ_SCOPE));
            }
            if wanted.write && !held.write {
                return Err(ScopeError::NotHeld(WRITE_SCOPE));
            }
            Ok(wanted)
        }
    }
}

/// The scopes a verified token names. Unknown names are skipped (they grant nothing): a token
/// signed by a newer instance during a rolling upgrade may name more.
pub fn from_token(scope: &str) -> Permissions {
    let mut permissions = Permissions::default();
    for name in scope.split(' ') {
        add(&mut permissions, name);
    }
    permissions
}

/// The scope string of `permissions`: read first, then write, space-separated.
pub fn to_scope_string(permissions: Permissions) -> String {
    let mut names = Vec::with_capacity(2);
    if permissions.read {
        names.push(READ_SCOPE);
    }
    if permissions.write {
        names.push(WRITE_SCOPE);
    }
    names.join(" ")
}

/// What a token grants now: its scopes, within what its client holds now.
pub fn granted_now(token_scopes: Permissions, held_now: Permissions) -> Permissions {
    Permissions {
        read: token_scopes.read && held_now.read,
        write: token_scopes.write && held_now.write,
        admin: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Permissions = Permissions {
        read: true,
        write: false,
        admin: false,
    };
    const READ_WRITE: Permissions = Permissions {
        read: true,
        write: true,
        admin: false,
    };
    const ALL: Permissions = Permissions {
        read: true,
        write: true,
        admin: true,
    };
    const ADMIN_ONLY: Permissions = Permissions {
        read: false,
        write: false,
        admin: true,
    };

    #[test]
    fn no_scope_grants_every_consent_permission_held() {
        assert_eq!(to_grant(None, READ), Ok(READ));
        assert_eq!(to_grant(Some("  "), READ), Ok(READ));
        assert_eq!(to_grant(None, ALL), Ok(READ_WRITE), "never admin");
        assert_eq!(to_grant(None, ADMIN_ONLY), Err(ScopeError::NothingToGrant));
    }

    #[test]
    fn requested_scopes_must_be_known_and_held() {
        let both = format!("{WRITE_SCOPE}  {READ_SCOPE} {READ_SCOPE}");
        assert_eq!(to_grant(Some(&both), ALL), Ok(READ_WRITE));
        assert_eq!(to_grant(Some(READ_SCOPE), ALL), Ok(READ));
        assert_eq!(
            to_grant(Some(&both), READ),
            Err(ScopeError::NotHeld(WRITE_SCOPE))
        );
        assert_eq!(
            to_grant(Some(READ_SCOPE), ADMIN_ONLY),
            Err(ScopeError::NotHeld(READ_SCOPE))
        );
        for unknown in ["admin", "voicebiometrics-consent:admin", "a\tb"] {
            assert_eq!(
                to_grant(Some(unknown), ALL),
                Err(ScopeError::Unknown(unknown.to_owned()))
            );
        }
    }

    #[test]
    fn scope_strings_round_trip() {
        assert_eq!(
            to_scope_string(READ_WRITE),
            format!("{READ_SCOPE} {WRITE_SCOPE}")
        );
        assert_eq!(to_scope_string(READ), READ_SCOPE);
        for permissions in [READ, READ_WRITE] {
            assert_eq!(from_token(&to_scope_string(permissions)), permissions);
        }
        assert_eq!(
            from_token("future:scope voicebiometrics-consent:read"),
            READ
        );
    }

    #[test]
    fn a_token_grants_no_more_than_its_client_holds_now() {
        assert_eq!(granted_now(READ_WRITE, READ), READ);
        assert_eq!(granted_now(READ, ALL), READ);
        assert_eq!(granted_now(READ_WRITE, ADMIN_ONLY), Permissions::default());
    }
}
