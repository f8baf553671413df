//! The routing table (SPEC §5 "Routing"): which service answers a path, by longest path prefix
//! and, where the command and query sides share a prefix, by method; and which roles the edge
//! requires before forwarding. It is configuration (`GATEWAY_ROUTES`), parsed once at start: a
//! bad table stops the gateway with a message naming the entry.
//!
//! The text format, one entry per line or `;`-separated:
//!
//! ```text
//! [METHOD[,METHOD...]] PREFIX -> TARGET [roles=ROLE[,ROLE...]]
//! ```
//!
//! `TARGET` is `gateway` (the gateway answers itself) or an upstream: `command-api`,
//! `projector`, `fraud-worker`. Without methods an entry matches every method. A prefix matches
//! a path equal to it or continuing with `/`: `/api/v1/accounts` matches
//! `/api/v1/accounts/42/balance`, not `/api/v1/accountsx`.

use std::collections::BTreeSet;
use std::fmt;

use axum::http::Method;
use infra::auth::Role;

/// SPEC §5's table.
pub const DEFAULT_ROUTES: &str = "\
/api/v1/auth -> gateway;
/api/v1/admin -> gateway roles=admin;
POST /api/v1/accounts -> command-api;
GET,HEAD /api/v1/accounts -> projector;
POST /api/v1/transactions -> command-api;
GET,HEAD /api/v1/transactions -> projector;
/api/v1/fraud -> fraud-worker roles=admin,auditor";

/// Longest accepted prefix, in bytes.
const PREFIX_BYTES_MAX: usize = 256;

/// A service behind the gateway. Its address comes from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Upstream {
    CommandApi,
    Projector,
    FraudWorker,
}

impl Upstream {
    pub const ALL: [Upstream; 3] = [
        Upstream::CommandApi,
        Upstream::Projector,
        Upstream::FraudWorker,
    ];

    /// The name used in the table, in `/health` and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Upstream::CommandApi => "command-api",
            Upstream::Projector => "projector",
            Upstream::FraudWorker => "fraud-worker",
        }
    }

    fn parse(text: &str) -> Option<Upstream> {
        Upstream::ALL
            .into_iter()
            .find(|upstream| upstream.name() == text)
    }
}

/// Who answers a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The gateway's own routes (identity, administration).
    Gateway,
    Upstream(Upstream),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Gateway => f.write_str("gateway"),
            Target::Upstream(upstream) => f.write_str(upstream.name()),
        }
    }
}

/// One entry of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: String,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub target: Target,
    /// The caller needs one of these (403 otherwise); empty: any valid token.
    pub roles: Vec<Role>,
}

impl Route {
    fn matches_path(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    fn accepts(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|methods| methods.contains(method))
    }
}

/// What the table says about a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution<'a> {
    Route(&'a Route),
    /// A prefix matches, but no entry of it takes this method.
    MethodNotAllowed,
    NotFound,
}

/// The parsed table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTable {
    routes: Vec<Route>,
}

impl RoutingTable {
    /// Parses the text format of this module's documentation.
    pub fn parse(text: &str) -> Result<RoutingTable, String> {
        let mut routes: Vec<Route> = Vec::new();
        for entry in text
            .split([';', '\n'])
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let route = parse_entry(entry).map_err(|problem| format!("{entry:?}: {problem}"))?;
            if let Some(clash) = routes.iter().find(|other| overlaps(other, &route)) {
                return Err(format!(
                    "{entry:?} overlaps the entry for {} {} on the same prefix",
                    methods_text(&clash.methods),
                    clash.prefix
                ));
            }
            routes.push(route);
        }
        if routes.is_empty() {
            return Err("the table has no entries".to_owned());
        }
        Ok(RoutingTable { routes })
    }

    /// The entry for `method` and `path`: the longest matching prefix, then the entry of that
    /// prefix that takes the method.
    pub fn resolve(&self, method: &Method, path: &str) -> Resolution<'_> {
        let Some(longest) = self
            .routes
            .iter()
            .filter(|route| route.matches_path(path))
            .map(|route| route.prefix.len())
            .max()
        else {
            return Resolution::NotFound;
        };
        self.routes
            .iter()
            .filter(|route| route.prefix.len() == longest && route.matches_path(path))
            .find(|route| route.accepts(method))
            .map_or(Resolution::MethodNotAllowed, Resolution::Route)
    }

    /// The methods the entries of `path`'s longest matching prefix take, for a 405's `Allow`.
    pub fn allowed_methods(&self, path: &str) -> Vec<Method> {
        let Some(longest) = self
            .routes
            .iter()
            .filter(|route| route.matches_path(path))
            .map(|route| route.prefix.len())
            .max()
        else {
            return Vec::new();
        };
        let mut methods: Vec<Method> = self
            .routes
            .iter()
            .filter(|route| route.prefix.len() == longest && route.matches_path(path))
            .flat_map(|route| route.methods.clone().unwrap_or_else(|| METHODS.to_vec()))
            .collect();
        methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        methods.dedup();
        methods
    }

    /// The upstreams some entry sends requests to: the ones `/health` checks.
    pub fn upstreams(&self) -> BTreeSet<Upstream> {
        self.routes
            .iter()
            .filter_map(|route| match route.target {
                Target::Upstream(upstream) => Some(upstream),
                Target::Gateway => None,
            })
            .collect()
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

impl Default for RoutingTable {
    fn default() -> Self {
        RoutingTable::parse(DEFAULT_ROUTES)
            .expect("the default table is valid (a unit test proves it)")
    }
}

impl fmt::Display for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .routes
            .iter()
            .map(|route| {
                let mut entry = String::new();
                if let Some(methods) = &route.methods {
                    let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
                    entry.push_str(&names.join(","));
                    entry.push(' ');
                }
                entry.push_str(&format!("{} -> {}", route.prefix, route.target));
                if !route.roles.is_empty() {
                    let names: Vec<&str> =
                        route.roles.iter().map(|role| role_name(*role)).collect();
                    entry.push_str(&format!(" roles={}", names.join(",")));
                }
                entry
            })
            .collect();
        f.write_str(&entries.join("; "))
    }
}

fn role_name(role: Role) -> &'static str {
    role.name()
}

fn methods_text(methods: &Option<Vec<Method>>) -> String {
    methods.as_ref().map_or_else(
        || "every method".to_owned(),
        |methods| {
            methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(",")
        },
    )
}

/// Two entries overlap when they have the same prefix and could both take one method.
fn overlaps(first: &Route, second: &Route) -> bool {
    first.prefix == second.prefix
        && match (&first.methods, &second.methods) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) => a.iter().any(|method| b.contains(method)),
        }
}

fn parse_entry(entry: &str) -> Result<Route, String> {
    let (left, right) = entry
        .split_once("->")
        .ok_or("an entry is `[METHODS] PREFIX -> TARGET [roles=ROLES]`")?;
    let left: Vec<&str> = left.split_whitespace().collect();
    let (methods, prefix) = match left.as_slice() {
        [prefix] => (None, *prefix),
        [methods, prefix] => (Some(parse_methods(methods)?), *prefix),
        _ => return Err("expected `[METHODS] PREFIX` before `->`".to_owned()),
    };
    let right: Vec<&str> = right.split_whitespace().collect();
    let (target, roles) = match right.as_slice() {
        [target] => (*target, None),
        [target, roles] => (*target, Some(*roles)),
        _ => return Err("expected `TARGET [roles=ROLES]` after `->`".to_owned()),
    };
    let target = match target {
        "gateway" => Target::Gateway,
        name => Target::Upstream(Upstream::parse(name).ok_or_else(|| {
            format!(
                "unknown target {name:?}; targets are gateway, command-api, projector, fraud-worker"
            )
        })?),
    };
    let roles = match roles {
        None => Vec::new(),
        Some(text) => parse_roles(text)?,
    };
    Ok(Route {
        prefix: parse_prefix(prefix)?,
        methods,
        target,
        roles,
    })
}

/// The methods an entry may name; an entry without methods takes all of them.
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

fn parse_methods(text: &str) -> Result<Vec<Method>, String> {
    let mut methods = Vec::new();
    for name in text.split(',') {
        let method = METHODS
            .iter()
            .find(|method| method.as_str() == name)
            .cloned()
            .ok_or_else(|| format!("unknown method {name:?}"))?;
        if !methods.contains(&method) {
            methods.push(method);
        }
    }
    Ok(methods)
}

fn parse_prefix(text: &str) -> Result<String, String> {
    let plain = text.len() <= PREFIX_BYTES_MAX
        && text.starts_with('/')
        && text.len() > 1
        && !text.ends_with('/')
        && text
            .split('/')
            .skip(1)
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~'));
    if plain {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "the prefix {text:?} must be an absolute path of plain segments, without a trailing slash"
        ))
    }
}

fn parse_roles(text: &str) -> Result<Vec<Role>, String> {
    let list = text
        .strip_prefix("roles=")
        .ok_or_else(|| format!("expected roles=ROLE[,ROLE...], not {text:?}"))?;
    let mut roles = Vec::new();
    for name in list.split(',') {
        let role = Role::parse(name)
            .ok_or_else(|| format!("unknown role {name:?}; roles are {}", Role::list()))?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_of(table: &RoutingTable, method: Method, path: &str) -> Option<Target> {
        match table.resolve(&method, path) {
            Resolution::Route(route) => Some(route.target),
            _ => None,
        }
    }

    #[test]
    fn the_default_table_routes_as_spec_says() {
        let table = RoutingTable::default();
        let command = Some(Target::Upstream(Upstream::CommandApi));
        let query = Some(Target::Upstream(Upstream::Projector));
        assert_eq!(target_of(&table, Method::POST, "/api/v1/accounts"), command);
        assert_eq!(target_of(&table, Method::GET, "/api/v1/accounts"), query);
        assert_eq!(
            target_of(&table, Method::GET, "/api/v1/accounts/1/history"),
            query
        );
        assert_eq!(
            target_of(&table, Method::POST, "/api/v1/transactions"),
            command
        );
        assert_eq!(
            target_of(&table, Method::GET, "/api/v1/transactions/1/events"),
            query
        );
        assert_eq!(
            target_of(&table, Method::GET, "/api/v1/fraud/rules"),
            Some(Target::Upstream(Upstream::FraudWorker))
        );
        assert_eq!(
            target_of(&table, Method::POST, "/api/v1/auth/token"),
            Some(Target::Gateway)
        );
        assert_eq!(
            table.resolve(&Method::DELETE, "/api/v1/accounts/1"),
            Resolution::MethodNotAllowed
        );
        assert_eq!(
            table.resolve(&Method::GET, "/api/v1/accountsx"),
            Resolution::NotFound
        );
        assert_eq!(
            table.allowed_methods("/api/v1/accounts/42"),
            vec![Method::GET, Method::HEAD, Method::POST]
        );
        assert_eq!(
            table.resolve(&Method::GET, "/api/v2/x"),
            Resolution::NotFound
        );
        let fraud = table.resolve(&Method::GET, "/api/v1/fraud/rules");
        let Resolution::Route(route) = fraud else {
            panic!("routed")
        };
        assert_eq!(route.roles, vec![Role::Admin, Role::Auditor]);
        assert_eq!(table.upstreams().len(), 3);
        let operator =
            RoutingTable::parse("POST /api/v1/transactions -> command-api roles=operator")
                .expect("the operator role is known to the table");
        assert!(
            operator.to_string().contains("roles=operator"),
            "{operator}"
        );
    }

    #[test]
    fn the_longest_prefix_wins_and_the_table_prints_as_it_parses() {
        let table = RoutingTable::parse(
            "/api/v1/fraud -> fraud-worker\n/api/v1/fraud/admin -> gateway roles=admin",
        )
        .expect("valid");
        assert_eq!(
            target_of(&table, Method::GET, "/api/v1/fraud/admin/x"),
            Some(Target::Gateway)
        );
        assert_eq!(
            target_of(&table, Method::GET, "/api/v1/fraud/rules"),
            Some(Target::Upstream(Upstream::FraudWorker))
        );
        let default = RoutingTable::default();
        assert_eq!(
            RoutingTable::parse(&default.to_string()).expect("reparses"),
            default
        );
    }

    #[test]
    fn bad_tables_are_refused_with_the_entry_named() {
        let cases = [
            ("", "no entries"),
            ("/api/v1/x", "PREFIX -> TARGET"),
            ("/api/v1/x -> nowhere", "unknown target"),
            ("FETCH /api/v1/x -> projector", "unknown method"),
            ("api/v1/x -> projector", "absolute path"),
            ("/api/v1/x/ -> projector", "trailing slash"),
            ("/api/../x -> projector", "plain segments"),
            ("/api/v1/x -> projector roles=root", "unknown role"),
            ("/api/v1/x -> projector admin", "roles="),
            (
                "GET /a -> projector; GET,POST /a -> command-api",
                "overlaps",
            ),
            ("/a -> projector; POST /a -> command-api", "overlaps"),
        ];
        for (text, expected) in cases {
            let error = RoutingTable::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
