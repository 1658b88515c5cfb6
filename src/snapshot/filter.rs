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
//!
//! What one List's filters may cost is bounded, since any client can send them and they are
//! parsed before the List waits for its turn (see [`MAX_FILTERS`] and below).

use regex::{Regex, RegexBuilder};

/// Most filter strings in one List. containerd sends none (its garbage collector) or the few
/// an operator gives `ctr snapshots ls`.
pub const MAX_FILTERS: usize = 64;
/// Longest filter string: room for an equality on the longest label containerd accepts (4096
/// bytes of key and value), quoted and escaped.
pub const MAX_FILTER_BYTES: usize = 16 << 10;
/// Most regular expressions (`~=`) in one List's filters, all strings together. Each may
/// compile to [`REGEX_SIZE_LIMIT`] bytes and keep as much again of matching state, so this
/// bounds what a List's filters hold to a few MiB.
pub const MAX_REGEXES: usize = 16;
/// Most bytes one regular expression may compile to, and may use for the lazy DFA that
/// matches it (the regex crate allows 10 MiB and 2 MiB). Expressions on names and labels are
/// far smaller: `^sha256:[a-f0-9]{64}$` takes 6 KB, `\w+` 50 KB, `.{100}` 100 KB. Repeated
/// Unicode classes are what grows (`\w{64}` takes 3 MB), and compiling them costs CPU in
/// proportion, which this bounds too: compiling stops at the limit.
pub const REGEX_SIZE_LIMIT: usize = 256 << 10;

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

/// Why a List's filters are refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error(transparent)]
    Parse(ParseError),
    #[error("{0} filters; at most {MAX_FILTERS} are accepted in one List")]
    TooMany(usize),
    /// Which filter (from 1) and its length.
    #[error("filter #{0} is {1} bytes long; at most {MAX_FILTER_BYTES} bytes are accepted")]
    TooLong(usize, usize),
    #[error(
        "more than {MAX_REGEXES} regular expressions (~=) in one List's filters; at most \
         {MAX_REGEXES} are accepted"
    )]
    TooManyRegexes,
}

impl Filter {
    /// Parses every string; the result matches an object if any of them does.
    pub fn parse_all(filters: &[String]) -> Result<Filter, FilterError> {
        if filters.len() > MAX_FILTERS {
            return Err(FilterError::TooMany(filters.len()));
        }
        if let Some((i, f)) = filters
            .iter()
            .enumerate()
            .find(|(_, f)| f.len() > MAX_FILTER_BYTES)
        {
            return Err(FilterError::TooLong(i + 1, f.len()));
        }
        let mut any = Vec::with_capacity(filters.len());
        let mut regexes = 0;
        for f in filters {
            if f.is_empty() {
                // containerd: the empty filter matches everything.
                any.push(Vec::new());
            } else {
                let mut parser = Parser::new(f, regexes);
                any.push(parser.selectors()?);
                regexes = parser.regexes;
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
    /// Regular expressions compiled so far, in this string and the List's earlier ones.
    regexes: usize,
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
    /// `regexes`: how many the List's earlier strings hold.
    fn new(input: &'a str, regexes: usize) -> Self {
        Parser {
            input,
            pos: 0,
            want_value: false,
            regexes,
        }
    }

    fn err<T>(&self, pos: usize, msg: impl Into<String>) -> Result<T, FilterError> {
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
        Err(FilterError::Parse(ParseError {
            input: self.input.to_string(),
            pos,
            msg,
        }))
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

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
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

    fn selector(&mut self) -> Result<Selector, FilterError> {
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
            "~=" => {
                // Counted before compiling: the count bounds the cost of compiling too.
                self.regexes += 1;
                if self.regexes > MAX_REGEXES {
                    return Err(FilterError::TooManyRegexes);
                }
                let compiled = RegexBuilder::new(&value)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build();
                match compiled {
                    Ok(re) => Op::Matches(re),
                    Err(regex::Error::CompiledTooBig(_)) => {
                        return self.err(
                            vpos,
                            format!(
                                "regular expression too big: it compiles to more than \
                                 {REGEX_SIZE_LIMIT} bytes, lamina's limit (repeated Unicode \
                                 classes such as \\w{{64}} grow fast; [0-9a-z] does not)"
                            ),
                        )
                    }
                    Err(e) => return self.err(vpos, format!("bad regular expression: {e}")),
                }
            }
            other => return self.err(pos, format!("unsupported operator {other:?}")),
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, FilterError> {
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
        match Filter::parse_all(&[filter.to_string()]) {
            Err(FilterError::Parse(e)) => e,
            other => panic!("{filter:?}: expected a parse error, got {other:?}"),
        }
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

    fn all(filters: &[String]) -> Result<Filter, FilterError> {
        Filter::parse_all(filters)
    }

    #[test]
    fn how_many_filters_and_how_long() {
        let many: Vec<String> = (0..=MAX_FILTERS).map(|i| format!("name==n{i}")).collect();
        assert!(all(&many[..MAX_FILTERS]).is_ok());
        assert_eq!(
            all(&many).unwrap_err(),
            FilterError::TooMany(MAX_FILTERS + 1)
        );

        let long = |len: usize| format!("name=={}", "x".repeat(len - 6));
        assert!(all(&[long(MAX_FILTER_BYTES)]).is_ok());
        let e = all(&["name".into(), long(MAX_FILTER_BYTES + 1)]).unwrap_err();
        assert_eq!(e, FilterError::TooLong(2, MAX_FILTER_BYTES + 1));
        assert!(e.to_string().contains("at most 16384 bytes"), "{e}");
    }

    #[test]
    fn regular_expressions_are_counted_over_all_strings() {
        let half = MAX_REGEXES / 2;
        let some = |n: usize| vec!["name~=a"; n].join(",");
        assert!(all(&[some(half), some(MAX_REGEXES - half)]).is_ok());
        let e = all(&[some(half), some(MAX_REGEXES - half + 1)]).unwrap_err();
        assert_eq!(e, FilterError::TooManyRegexes);
        assert!(e.to_string().contains("at most 16"), "{e}");
    }

    #[test]
    fn regular_expressions_too_big_compiled_are_refused() {
        // Each within the regex crate's own 10 MiB; typical ones far below lamina's limit.
        for ok in ["^sha256:[a-f0-9]{64}$", r"\w+", "/.{100}/"] {
            assert!(all(&[format!("name~={ok}")]).is_ok(), "{ok}");
        }
        for big in ["/.{500}/", r"\w{64}", r"[\p{L}]{20}"] {
            let e = fails(&format!("name~={big}"));
            assert_eq!(e.pos, 6, "{big}");
            assert!(
                e.to_string().contains("more than 262144 bytes"),
                "{big}: {e}"
            );
        }
    }
}
