//! containerd's filter language, as List (Walk) takes it.
//!
//! ```text
//! filters   := one or more strings; an object matches if ANY string matches
//! selectors := selector ("," selector)*          all must match
//! selector  := fieldpath (operator value)?       no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := "quoted" | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+                   /re/ and |re| only after ~=
//! ```
//! The scanner follows containerd's token by token (where whitespace may stand, which runes end a
//! value), so a filter means here what it means to containerd. One deliberate difference: a
//! regular expression that does not compile is a parse error, not a selector that silently
//! never matches. One known difference: expressions are Rust's (the regex crate), whose `\d`,
//! `\w`, `\s` and `\b` are Unicode-aware where Go's are ASCII-only, so `\d` also matches the
//! digits of other scripts.

use regex::Regex;

/// Gives a filter the value of a field path, or `None` when the field is absent.
pub trait Fields {
    fn field(&self, path: &[String]) -> Option<String>;
}

/// A parsed list of filter strings.
#[derive(Debug)]
pub struct Filter {
    /// One conjunction per filter string; empty means "match everything".
    any: Vec<Vec<Selector>>,
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// Why a filter string does not parse, with the position in it. Shows at most the first
/// `SHOWN` characters of the filter: an error must not echo a huge input back whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "filter {} does not parse at byte {pos}: {msg}",
    crate::snapshot::shorten(input)
)]
pub struct ParseError {
    input: String,
    pos: usize,
    msg: String,
}

impl Filter {
    /// Parses every string; the result matches an object if any of them does.
    pub fn parse_all(filters: &[String]) -> Result<Filter, ParseError> {
        let mut any = Vec::with_capacity(filters.len());
        for f in filters {
            if f.is_empty() {
                // containerd: the empty filter matches everything.
                any.push(Vec::new());
            } else {
                any.push(Parser::new(f).selectors()?);
            }
        }
        Ok(Filter { any })
    }

    pub fn matches(&self, obj: &dyn Fields) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(obj)))
    }
}

impl Selector {
    fn matches(&self, obj: &dyn Fields) -> bool {
        let value = obj.field(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.as_deref() == Some(v.as_str()),
            // An absent field reads as "" for != and ~=, as in containerd.
            Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Eof,
    Quoted(char, String),
    Value(String),
    Field(String),
    Separator(char),
    Operator(String),
    Illegal(String),
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
    /// The next token is a value (we just read an operator): values take more runes than fields.
    want_value: bool,
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            pos: 0,
            want_value: false,
        }
    }

    fn err<T>(&self, pos: usize, msg: impl Into<String>) -> Result<T, ParseError> {
        // The message may quote the input too (a bad regular expression is shown whole by the
        // regex crate): keep it short as well.
        let mut msg: String = msg.into();
        if msg.len() > 512 {
            let mut end = 512;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            msg.truncate(end);
            msg.push('…');
        }
        Err(ParseError {
            input: self.input.to_string(),
            pos,
            msg,
        })
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    /// The next raw character, without skipping whitespace (as containerd's `peek`).
    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        let len = self
            .rest()
            .find(|c: char| !f(c))
            .unwrap_or(self.rest().len());
        self.pos += len;
        &self.input[start..self.pos]
    }

    fn scan(&mut self) -> (usize, Token) {
        self.take_while(char::is_whitespace);
        let start = self.pos;
        let Some(c) = self.peek() else {
            return (start, Token::Eof);
        };
        if c == '\0' {
            return (start, Token::Illegal("unexpected NUL".into()));
        }
        if is_quote(c) {
            return (start, self.scan_quoted(c));
        }
        if c == ',' || c == '.' {
            self.pos += 1;
            self.want_value = false;
            return (start, Token::Separator(c));
        }
        if matches!(c, '=' | '!' | '~') {
            let op = self.take_while(|c| matches!(c, '=' | '!' | '~'));
            self.want_value = true;
            return (start, Token::Operator(op.to_string()));
        }
        if self.want_value {
            self.want_value = false;
            let v = self.take_while(is_value_char);
            if v.is_empty() {
                self.pos += c.len_utf8();
                return (start, Token::Illegal(format!("unexpected {c:?}")));
            }
            return (start, Token::Value(v.to_string()));
        }
        if is_field_char(c) {
            return (
                start,
                Token::Field(self.take_while(is_field_char).to_string()),
            );
        }
        self.pos += c.len_utf8();
        (start, Token::Illegal(format!("unexpected {c:?}")))
    }

    /// Reads a quoted literal starting at the opening `quote`; returns it unescaped.
    fn scan_quoted(&mut self, quote: char) -> Token {
        self.pos += quote.len_utf8();
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        loop {
            let Some((i, c)) = chars.next() else {
                self.pos = self.input.len();
                return Token::Illegal("quoted literal not terminated".into());
            };
            match c {
                c if c == quote => {
                    self.pos += i + c.len_utf8();
                    return Token::Quoted(quote, out);
                }
                '\n' => {
                    self.pos += i;
                    return Token::Illegal("quoted literal not terminated".into());
                }
                '\\' => {
                    let Some((_, e)) = chars.next() else { continue };
                    let simple = match e {
                        'a' => Some('\x07'),
                        'b' => Some('\x08'),
                        'f' => Some('\x0c'),
                        'n' => Some('\n'),
                        'r' => Some('\r'),
                        't' => Some('\t'),
                        'v' => Some('\x0b'),
                        '\\' => Some('\\'),
                        e if e == quote => Some(quote),
                        _ => None,
                    };
                    if let Some(s) = simple {
                        out.push(s);
                        continue;
                    }
                    let (digits, radix) = match e {
                        '0'..='7' => (2, 8),
                        'x' => (2, 16),
                        'u' => (4, 16),
                        'U' => (8, 16),
                        _ => {
                            self.pos = self.input.len();
                            return Token::Illegal(format!("illegal escape sequence \\{e}"));
                        }
                    };
                    let mut text = if radix == 8 {
                        e.to_string()
                    } else {
                        String::new()
                    };
                    for _ in 0..digits {
                        match chars.next() {
                            Some((_, d)) if d.is_digit(radix) => text.push(d),
                            _ => {
                                self.pos = self.input.len();
                                return Token::Illegal("illegal numeric escape sequence".into());
                            }
                        }
                    }
                    let code = u32::from_str_radix(&text, radix).ok();
                    // \ooo and \xHH are bytes in Go; lamina keeps strings UTF-8, so only
                    // the ASCII range of those is accepted.
                    let ok = match (radix, e) {
                        (16, 'u') | (16, 'U') => code.and_then(char::from_u32),
                        _ => code.filter(|c| *c < 0x80).and_then(char::from_u32),
                    };
                    match ok {
                        Some(ch) => out.push(ch),
                        None => {
                            self.pos = self.input.len();
                            return Token::Illegal(format!(
                                "escape \\{e}{text} is not a character"
                            ));
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, ParseError> {
        let mut all = vec![self.selector()?];
        loop {
            match self.peek() {
                Some(',') => {
                    self.scan();
                    all.push(self.selector()?);
                }
                None => return Ok(all),
                Some(c) => return self.err(self.pos, format!("unexpected input {c:?}")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, ParseError> {
        let path = self.fieldpath()?;
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        }
        let (pos, tok) = self.scan();
        let op = match tok {
            Token::Operator(op) => op,
            Token::Illegal(msg) => return self.err(pos, msg),
            _ => return self.err(pos, r#"expected an operator ("=="|"!="|"~=")"#),
        };
        let (vpos, tok) = self.scan();
        let value = match tok {
            Token::Value(v) | Token::Field(v) => v,
            Token::Quoted('"', v) => v,
            Token::Quoted(_, v) if op == "~=" => v,
            Token::Quoted(..) => {
                return self.err(
                    vpos,
                    "/…/ and |…| quote only regular expressions (after ~=)",
                )
            }
            Token::Illegal(msg) => return self.err(vpos, msg),
            Token::Eof => return self.err(vpos, "expected a value, found the end"),
            _ => return self.err(vpos, "expected a value or a quoted string"),
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            "~=" => match Regex::new(&value) {
                Ok(re) => Op::Matches(re),
                Err(e) => return self.err(vpos, format!("bad regular expression: {e}")),
            },
            other => return self.err(pos, format!("unsupported operator {other:?}")),
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, ParseError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, ParseError> {
        let (pos, tok) = self.scan();
        match tok {
            Token::Field(f) => Ok(f),
            Token::Quoted('"', f) => Ok(f),
            Token::Quoted(..) => self.err(pos, "a field may only be quoted with \"…\""),
            Token::Illegal(msg) => self.err(pos, msg),
            Token::Eof => self.err(pos, "expected a field, found the end"),
            _ => self.err(pos, "expected a field or a quoted string"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Obj {
        name: &'static str,
        parent: &'static str,
        labels: BTreeMap<String, String>,
    }

    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path.first()?.as_str() {
                "name" => Some(self.name.into()),
                "parent" => Some(self.parent.into()),
                "labels" if path.len() > 1 => self.labels.get(&path[1..].join(".")).cloned(),
                _ => None,
            }
        }
    }

    fn obj(name: &'static str, parent: &'static str, labels: &[(&str, &str)]) -> Obj {
        Obj {
            name,
            parent,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn matches(filters: &[&str], o: &Obj) -> bool {
        let fs: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filter::parse_all(&fs).unwrap().matches(o)
    }

    fn fails(filter: &str) -> ParseError {
        Filter::parse_all(&[filter.to_string()]).unwrap_err()
    }

    #[test]
    fn empty_list_and_empty_string_match_everything() {
        let o = obj("a", "", &[]);
        assert!(matches(&[], &o));
        assert!(matches(&[""], &o));
    }

    #[test]
    fn equality_and_presence() {
        let o = obj("a", "p", &[("l1", "2")]);
        assert!(matches(&["name==a"], &o));
        assert!(!matches(&["name==b"], &o));
        assert!(matches(&["name==a,labels.l1"], &o));
        assert!(!matches(&["name==a,labels.l2"], &o));
        assert!(matches(&["labels.l1==2"], &o));
        assert!(matches(&["parent==p"], &o));
        assert!(matches(&["name"], &o), "name is always present");
        assert!(!matches(&["nosuchfield"], &o));
        assert!(
            !matches(&["labels.l2==\"\""], &o),
            "== needs the field present"
        );
    }

    #[test]
    fn not_equal_reads_absent_as_empty() {
        let with_parent = obj("a", "p", &[]);
        let no_parent = obj("b", "", &[]);
        assert!(matches(&["parent!=\"\""], &with_parent));
        assert!(!matches(&["parent!=\"\""], &no_parent));
        assert!(!matches(&["labels.x!=\"\""], &no_parent));
        assert!(matches(&["labels.x!=y"], &no_parent));
    }

    #[test]
    fn regular_expressions_with_every_quote() {
        let o = obj("layer-12", "", &[("a.b", "xyz")]);
        assert!(matches(&["name~=^layer-[0-9]+$"], &o));
        assert!(matches(&["name~=/^layer/"], &o));
        assert!(matches(&["name~=|^layer-1|"], &o));
        assert!(matches(&["name~=\"2$\""], &o));
        assert!(!matches(&["name~=^x"], &o));
        assert!(
            matches(&["labels.a.b~=y"], &o),
            "dotted label keys are joined back"
        );
    }

    #[test]
    fn quoted_fields_and_values() {
        let o = obj("a b,c", "", &[("containerd.io/gc.root", "check-walk")]);
        assert!(matches(
            &["labels.\"containerd.io/gc.root\"==check-walk"],
            &o
        ));
        assert!(matches(&["name==\"a b,c\""], &o));
        assert!(matches(&["name==\"a\\x20b\\u002cc\""], &o));
        assert!(matches(&["\"name\"==\"a b,c\""], &o));
    }

    #[test]
    fn strings_are_or_selectors_are_and() {
        let o = obj("a", "", &[("l", "1")]);
        assert!(matches(&["name==x", "name==a"], &o));
        assert!(!matches(&["name==x", "labels.l==2"], &o));
        assert!(!matches(&["name==a,labels.l==2"], &o));
        assert!(
            matches(&["name==a, labels.l==1"], &o),
            "space may follow a comma"
        );
        assert!(
            matches(&["name == a"], &o),
            "space may surround an operator"
        );
    }

    #[test]
    fn values_run_to_the_next_comma() {
        let o = obj("sha256:ab/c.d=e", "", &[]);
        assert!(matches(&["name==sha256:ab/c.d=e"], &o));
    }

    #[test]
    fn malformed_filters_are_errors_that_say_where() {
        for bad in [
            "name==",
            "name=",
            "name=~a",
            "name===a",
            "==a",
            "name==a,",
            ",name",
            "name==a b",
            "name==\"open",
            "name==/re/",
            "/name/==a",
            "name~=\"(\"",
            "labels.",
            "name==\"\\q\"",
            "na\0me",
            "name==\"\\xff\"",
        ] {
            let e = fails(bad);
            assert!(e.to_string().contains("does not parse"), "{bad:?}: {e}");
        }
        assert_eq!(fails("name==a b").pos, 7);
    }
}
