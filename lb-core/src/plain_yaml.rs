//! A reader for the plain subset of YAML that manifests are usually written in, about
//! ten times faster than serde_yaml (libyaml): block mappings and sequences indented
//! with spaces, flow mappings and sequences on one line, plain, single- and
//! double-quoted scalars on one line, comments.
//!
//! It reads a document into a tree of [`Node`]s that borrow their strings from the text,
//! and deserializes the document's type from that tree ([`from_str`]), only when it is
//! sure to read it as serde_yaml does; it gives up (`None`) at anything else: anchors,
//! aliases, tags,
//! block scalars (`|`, `>`), scalars over several lines, complex keys, a duplicate key,
//! tabs, a plain scalar that YAML could read as a number other than a decimal integer
//! (`1.5`, `0x1f`, `1e3`, `.inf`), a second document. The caller then parses the
//! document with serde_yaml, which also names what is wrong with it.

use std::borrow::Cow;

/// A document `text` (with its `---` line, if any) as a `T`; `None` when it is empty,
/// not in the subset, or not a `T` as this reader has it (serde_yaml may still read it:
/// it reads a number as a string where a string is wanted, this reader does not).
pub fn from_str<T: serde::de::DeserializeOwned>(text: &str) -> Option<T> {
    T::deserialize(parse(text)?).ok()
}

/// One node of a document.
#[derive(Debug, Clone, PartialEq)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Str(Cow<'a, str>),
    Seq(Vec<Node<'a>>),
    /// Keys in the document's order, none twice.
    Map(Vec<(&'a str, Node<'a>)>),
}

/// The document `text` (with its `---` line, if any) as a tree; `None` when it is
/// empty or not in the subset.
pub fn parse(text: &str) -> Option<Node<'_>> {
    // Whitespace and line breaks that YAML reads otherwise than `trim` and `lines` do
    // (a carriage return, NEL, LS, PS, a non-breaking space, a form feed or vertical tab,
    // a byte order mark): left to serde_yaml.
    if text.contains([
        '\r', '\u{0b}', '\u{0c}', '\u{85}', '\u{a0}', '\u{2028}', '\u{2029}', '\u{feff}',
    ]) {
        return None;
    }
    let mut lines = Vec::new();
    let mut started = false;
    for raw in text.lines() {
        if raw.contains('\t') {
            return None;
        }
        let body = raw.trim_end();
        let content = body.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let marker = body.starts_with("---") || body.starts_with("...") || body.starts_with('%');
        if marker {
            // The document's own `---` line, before any content and alone on its line.
            let alone = body == "---" || body.strip_prefix("--- ").is_some_and(is_comment);
            if started || !alone {
                return None;
            }
            started = true;
            continue;
        }
        started = true;
        lines.push(Line {
            indent: body.len() - content.len(),
            text: content,
        });
    }
    let first = lines.first()?;
    if first.indent != 0 || is_item(first.text) {
        return None;
    }
    let mut reader = Reader { lines, at: 0 };
    let value = reader.mapping(0)?;
    (reader.at == reader.lines.len()).then_some(value)
}

/// Whether what follows a value is nothing but a comment.
fn is_comment(rest: &str) -> bool {
    let rest = rest.trim_start();
    rest.is_empty() || rest.starts_with('#')
}

/// A line with content: its indentation and its text (trailing spaces cut).
#[derive(Clone, Copy)]
struct Line<'a> {
    indent: usize,
    text: &'a str,
}

/// Whether a line's text is a sequence item (`- ...` or `-`).
fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

struct Reader<'a> {
    lines: Vec<Line<'a>>,
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<Line<'a>> {
        self.lines.get(self.at).copied()
    }

    /// The block (mapping or sequence) whose first line is the next one.
    fn block(&mut self) -> Option<Node<'a>> {
        let line = self.peek()?;
        if is_item(line.text) {
            self.sequence(line.indent)
        } else {
            self.mapping(line.indent)
        }
    }

    /// A block mapping whose keys are at `indent`.
    fn mapping(&mut self, indent: usize) -> Option<Node<'a>> {
        let mut map = Vec::new();
        while let Some(line) = self.peek().filter(|l| l.indent == indent) {
            if is_item(line.text) {
                return None; // An item among a mapping's keys.
            }
            let (key, rest) = split_key(line.text)?;
            self.at += 1;
            let value = self.value_after(rest, indent)?;
            insert(&mut map, key, value)?;
        }
        // A deeper line here would continue a scalar over lines, or be misindented.
        if self.peek().is_some_and(|l| l.indent > indent) {
            return None;
        }
        Some(Node::Map(map))
    }

    /// A block sequence whose `-` are at `indent`.
    fn sequence(&mut self, indent: usize) -> Option<Node<'a>> {
        let mut items = Vec::new();
        while let Some(line) = self
            .peek()
            .filter(|l| l.indent == indent && is_item(l.text))
        {
            let after = &line.text[1..];
            let content = after.trim_start();
            if content.is_empty() {
                self.at += 1;
                items.push(self.nested(indent)?);
            } else if is_item(content) {
                return None; // `- - x`
            } else if starts_flow_or_quote(content) || split_key(content).is_none() {
                self.at += 1;
                items.push(inline(content)?);
            } else {
                // `- key: value`: a mapping whose keys line up with `key`.
                let inner = indent + 1 + (after.len() - content.len());
                self.lines[self.at] = Line {
                    indent: inner,
                    text: content,
                };
                items.push(self.mapping(inner)?);
            }
        }
        if self.peek().is_some_and(|l| l.indent > indent) {
            return None;
        }
        Some(Node::Seq(items))
    }

    /// The value of a key at `indent` whose line goes on with `rest`.
    fn value_after(&mut self, rest: &'a str, indent: usize) -> Option<Node<'a>> {
        if !is_comment(rest) {
            return inline(rest);
        }
        match self.peek() {
            // A sequence may sit at its key's indentation.
            Some(l) if l.indent == indent && is_item(l.text) => self.sequence(indent),
            _ => self.nested(indent),
        }
    }

    /// The block under a line at `indent` (deeper), or null when there is none.
    fn nested(&mut self, indent: usize) -> Option<Node<'a>> {
        match self.peek() {
            Some(l) if l.indent > indent => self.block(),
            _ => Some(Node::Null),
        }
    }
}

fn starts_flow_or_quote(s: &str) -> bool {
    s.starts_with(['{', '[', '"', '\''])
}

/// A block mapping entry's plain key and what follows its `:`; `None` when the line is
/// not `key: ...` or `key:` with a plain key.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let (key, rest) = match find_pair(text, b':', b' ') {
        Some(i) => (&text[..i], &text[i + 2..]),
        None => (text.strip_suffix(':')?, ""),
    };
    key_ok(key).then_some((key, rest.trim_start()))
}

/// Where in `s` the byte `a` is first followed by `b` (a cheaper `s.find` of two bytes).
fn find_pair(s: &str, a: u8, b: u8) -> Option<usize> {
    let bytes = s.as_bytes();
    (0..bytes.len().saturating_sub(1)).find(|&i| bytes[i] == a && bytes[i + 1] == b)
}

/// Whether `s` is a plain scalar this reader takes as it is: no indicator first, no
/// `: ` or ` #` inside, nothing that a flow collection would split at, no space at
/// either end.
fn plain_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return false;
    };
    if b"-?:,[]{}#&*!|>'\"%@`".contains(&first)
        || first.is_ascii_whitespace()
        || last.is_ascii_whitespace()
        || last == b':'
    {
        return false;
    }
    let mut previous = first;
    for &c in &b[1..] {
        match c {
            b',' | b'[' | b']' | b'{' | b'}' => return false,
            b' ' if previous == b':' => return false,
            b'#' if previous == b' ' => return false,
            _ => {}
        }
        previous = c;
    }
    true
}

/// A value on the rest of a line: flow collection, quoted or plain scalar, and at most a
/// comment after it.
fn inline(s: &str) -> Option<Node<'_>> {
    let mut flow = Flow { s, at: 0 };
    let value = if starts_flow_or_quote(s) {
        flow.value()?
    } else {
        // A plain scalar runs to a comment (` #`) or the end of the line.
        let end = find_pair(s, b' ', b'#').unwrap_or(s.len());
        flow.at = end;
        let text = s[..end].trim_end();
        if text.contains(['{', '}', '[', ']', ',']) {
            // Allowed in a block plain scalar; this reader leaves them to serde_yaml.
            return None;
        }
        plain(text)?
    };
    is_comment(&s[flow.at..]).then_some(value)
}

/// A flow value being read from `s` at `at`.
struct Flow<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Flow<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.at..]
    }

    fn skip_spaces(&mut self) {
        self.at = self.s.len() - self.rest().trim_start_matches(' ').len();
    }

    /// Consumes `c` if it comes next (after spaces).
    fn eat(&mut self, c: char) -> bool {
        self.skip_spaces();
        let found = self.rest().starts_with(c);
        if found {
            self.at += c.len_utf8();
        }
        found
    }

    fn value(&mut self) -> Option<Node<'a>> {
        self.skip_spaces();
        match self.rest().chars().next()? {
            '{' => self.mapping(),
            '[' => self.sequence(),
            '"' => self.double_quoted().map(Node::Str),
            '\'' => self.single_quoted().map(Node::Str),
            _ => plain(self.plain_text()?),
        }
    }

    /// A plain scalar inside a flow collection: up to `,`, `]` or `}`.
    fn plain_text(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let end = rest.find([',', ']', '}']).unwrap_or(rest.len());
        let text = rest[..end].trim_end();
        self.at += end;
        (!text.is_empty()).then_some(text)
    }

    fn mapping(&mut self) -> Option<Node<'a>> {
        self.at += 1; // `{`
        let mut map = Vec::new();
        if self.eat('}') {
            return Some(Node::Map(map));
        }
        loop {
            self.skip_spaces();
            let rest = self.rest();
            let colon = find_pair(rest, b':', b' ')?;
            let key = &rest[..colon];
            if !key_ok(key) {
                return None;
            }
            self.at += colon + 2;
            let value = self.value()?;
            insert(&mut map, key, value)?;
            if self.eat('}') {
                return Some(Node::Map(map));
            }
            if !self.eat(',') || self.eat('}') {
                return None; // A trailing comma: left to serde_yaml.
            }
        }
    }

    fn sequence(&mut self) -> Option<Node<'a>> {
        self.at += 1; // `[`
        let mut items = Vec::new();
        if self.eat(']') {
            return Some(Node::Seq(items));
        }
        loop {
            items.push(self.value()?);
            if self.eat(']') {
                return Some(Node::Seq(items));
            }
            if !self.eat(',') || self.eat(']') {
                return None;
            }
        }
    }

    /// `"..."` on one line with the escapes `\\ \" \/ \n \t`.
    fn double_quoted(&mut self) -> Option<Cow<'a, str>> {
        let rest = self.rest();
        let body = &rest[1..];
        let end = body.find(['"', '\\'])?;
        if body[end..].starts_with('"') {
            self.at += end + 2;
            return Some(Cow::Borrowed(&body[..end]));
        }
        let mut out = String::from(&body[..end]);
        let mut chars = body[end..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.at += 1 + end + i + 1;
                    return Some(Cow::Owned(out));
                }
                '\\' => out.push(match chars.next()?.1 {
                    '\\' => '\\',
                    '"' => '"',
                    '/' => '/',
                    'n' => '\n',
                    't' => '\t',
                    _ => return None,
                }),
                c => out.push(c),
            }
        }
        None
    }

    /// `'...'` on one line, `''` standing for `'`.
    fn single_quoted(&mut self) -> Option<Cow<'a, str>> {
        let rest = self.rest();
        let end = 1 + rest[1..].find('\'')?;
        if !rest[end + 1..].starts_with('\'') {
            self.at += end + 1;
            return Some(Cow::Borrowed(&rest[1..end]));
        }
        let mut out = String::new();
        let mut i = 1;
        loop {
            let end = i + rest[i..].find('\'')?;
            out.push_str(&rest[i..end]);
            if rest[end + 1..].starts_with('\'') {
                out.push('\'');
                i = end + 2;
            } else {
                self.at += end + 1;
                return Some(Cow::Owned(out));
            }
        }
    }
}

/// Adds `key` to a mapping; `None` when it is there already (serde_yaml refuses a
/// duplicate key).
fn insert<'a>(map: &mut Vec<(&'a str, Node<'a>)>, key: &'a str, value: Node<'a>) -> Option<()> {
    if map.iter().any(|(k, _)| *k == key) {
        return None;
    }
    map.push((key, value));
    Some(())
}

/// What a plain scalar is as YAML 1.2's core schema (serde_yaml's) resolves it.
enum Plain {
    Str,
    Other(Node<'static>),
}

/// Resolves a plain scalar: null, boolean, decimal integer or string; `None` for what
/// this reader does not take (floats, other bases, signs, leading zeros, indicators).
fn resolve(s: &str) -> Option<Plain> {
    let first = *s.as_bytes().first()?;
    let negative = first == b'-' && s.len() > 1 && !s.starts_with("- ");
    if !(plain_ok(s) || negative && plain_ok(&s[1..])) {
        return None;
    }
    let keyword = match first {
        b'n' | b'N' | b'~' => matches!(s, "null" | "Null" | "NULL" | "~").then_some(Node::Null),
        b't' | b'T' => matches!(s, "true" | "True" | "TRUE").then_some(Node::Bool(true)),
        b'f' | b'F' => matches!(s, "false" | "False" | "FALSE").then_some(Node::Bool(false)),
        _ => None,
    };
    if let Some(node) = keyword {
        return Some(Plain::Other(node));
    }
    if !(first.is_ascii_digit() || b"+-.iInN".contains(&first)) {
        return Some(Plain::Str);
    }
    let digits = s.strip_prefix('-').unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if digits.len() > 1 && digits.starts_with('0') || s == "-0" {
            return None;
        }
        return Some(Plain::Other(Node::Int(s.parse().ok()?)));
    }
    if s.starts_with(['+', '.', '-']) || could_be_number(s) {
        return None;
    }
    Some(Plain::Str)
}

/// A plain scalar's value; `None` when [`resolve`] refuses it.
fn plain(s: &str) -> Option<Node<'_>> {
    Some(match resolve(s)? {
        Plain::Str => Node::Str(Cow::Borrowed(s)),
        Plain::Other(v) => v,
    })
}

/// Whether `s` is a plain key that YAML reads as a string.
fn key_ok(s: &str) -> bool {
    matches!(resolve(s), Some(Plain::Str))
}

/// Whether YAML might read `s` as a number (or Rust's float parser would): left to
/// serde_yaml. Addresses such as `10.96.0.1` are not numbers.
fn could_be_number(s: &str) -> bool {
    s.parse::<f64>().is_ok()
        || s.starts_with("0x")
        || s.starts_with("0o")
        || s.starts_with("0b")
        || (s.starts_with(|c: char| c.is_ascii_digit()) && s.contains(['_', ':']))
}

/// Why a tree is not the type wanted (the caller then tries serde_yaml).
#[derive(Debug)]
pub struct NotThat(String);

impl std::fmt::Display for NotThat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotThat {}

impl serde::de::Error for NotThat {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

impl<'de> serde::de::IntoDeserializer<'de, NotThat> for Node<'de> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

/// A tree deserializes as the JSON value it stands for would, but for structs, which
/// only a mapping is (as in YAML), and enums, which it leaves to serde_yaml.
impl<'de> serde::Deserializer<'de> for Node<'de> {
    type Error = NotThat;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, NotThat> {
        use serde::de::value::{MapDeserializer, SeqDeserializer};
        match self {
            Node::Null => v.visit_unit(),
            Node::Bool(b) => v.visit_bool(b),
            Node::Int(i) => v.visit_i64(i),
            Node::Str(Cow::Borrowed(s)) => v.visit_borrowed_str(s),
            Node::Str(Cow::Owned(s)) => v.visit_string(s),
            Node::Seq(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter());
                let out = v.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Node::Map(entries) => {
                let mut map = MapDeserializer::new(entries.into_iter());
                let out = v.visit_map(&mut map)?;
                map.end()?;
                Ok(out)
            }
        }
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, NotThat> {
        match self {
            Node::Null => v.visit_none(),
            other => v.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, NotThat> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, NotThat> {
        match self {
            Node::Map(_) => self.deserialize_any(v),
            _ => Err(NotThat(format!("{name}: not a mapping"))),
        }
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, NotThat> {
        Err(NotThat(format!("{name}: an enum")))
    }

    fn deserialize_ignored_any<V: serde::de::Visitor<'de>>(
        self,
        v: V,
    ) -> Result<V::Value, NotThat> {
        v.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf unit unit_struct seq tuple tuple_struct map identifier
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize as _;
    use serde_json::Value;

    use super::*;

    /// What this reader reads `text` as, in JSON.
    fn ours(text: &str) -> Option<Value> {
        Some(Value::deserialize(parse(text)?).unwrap())
    }

    /// What serde_yaml reads `text` as, in JSON.
    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    /// The subset reader reads `text` as serde_yaml does.
    #[track_caller]
    fn same(text: &str) {
        let ours = ours(text).unwrap_or_else(|| panic!("not read: {text}"));
        assert_eq!(ours, yaml(text), "{text}");
    }

    #[track_caller]
    fn refused(text: &str) {
        assert_eq!(ours(text), None, "{text}");
    }

    #[test]
    fn manifests_in_block_and_flow_style_read_as_serde_yaml_does() {
        same(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: svc-0, namespace: bench}\n\
             spec:\n  type: ClusterIP\n  clusterIP: 10.96.0.1\n  ports:\n  \
             - {name: tcp, port: 80, protocol: TCP, targetPort: 8080}\n",
        );
        same(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a\n  \
             labels: {kubernetes.io/service-name: svc-0}\naddressType: IPv4\nports:\n\
             - name: tcp\n  port: 8080\n  protocol: TCP\nendpoints:\n  - addresses: [10.245.0.1]\n    \
             conditions: {ready: true, serving: false}\n  - addresses:\n    - fd00::1\n    nodeName: n1\n",
        );
        same(
            "# a comment\n--- # after the marker\nkind: Service # trailing\nmetadata:\n  \
             annotations:\n    a: \"x: y # not a comment\"\n    b: 'it''s'\n    c: \"q\\\"\\n\"\n    \
             d: http://x/y\n    e: ~\n    f:\n    g: -1\n    h: a-b\n  labels: {}\n\
             list: []\nnested: [[1, 2], {a: b}]\nempty:\n\n\nlast: yes\n",
        );
        same("spec:\n  ports:\n  -   name: x\n      port: 1\n  - name: y\n");
        same("a:\n  -\n    b: 1\n  -\n  - c\n");
    }

    #[test]
    fn what_yaml_reads_otherwise_is_refused() {
        for text in [
            "a: 1.5",
            "a: 0x1f",
            "a: 1e3",
            "a: .inf",
            "a: 0123",
            "a: +1",
            "a: 1_000",
            "a: nan",
            "a: &x 1\nb: *x",
            "a: !!str 1",
            "a: |\n  text\n",
            "a: >\n  text\n",
            "a: b\n  c\n",
            "a: 1\na: 2",
            "a: {b: 1, b: 2}",
            "a: [1, 2,]",
            "a: [1,\n  2]",
            "a: \"x\\u0041\"",
            "a:\tb",
            "? a\n: b",
            "- a\n- b",
            "a: 1\n---\nb: 2",
            "%YAML 1.2\n---\na: 1",
            "--- a: 1",
            "a: b: c",
            "a: x, y",
            "a:\n- - b",
            "\"a\": 1",
            "a: 99999999999999999999",
            "80: a",
            "true: a",
            "a: {null: 1}",
            "",
            "# only a comment\n",
        ] {
            refused(text);
        }
    }

    #[test]
    fn scalars_resolve_as_the_core_schema() {
        same("a: [null, Null, NULL, ~, true, True, FALSE, 0, -7, 8080, 10.96.0.1, v1, a.b/c]");
        // Strings that look like numbers or keywords are refused, never misread.
        for s in ["1.0", "-0", "0o7", "0b1", "12:30", "+.5", ".5", "inf"] {
            refused(&format!("a: {s}"));
        }
    }

    #[test]
    fn the_repository_manifests_read_as_serde_yaml_does_or_are_refused() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
        let walk = crate::manifest::walk(&root, &crate::manifest::Limits::default()).unwrap();
        let mut read = 0;
        for file in walk.files {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in text.split("\n---").filter(|d| !d.trim().is_empty()) {
                let Some(ours) = ours(doc) else { continue };
                let theirs: Value = serde_yaml::from_str(doc).unwrap();
                assert_eq!(ours, theirs, "{}: {doc}", file.display());
                read += 1;
            }
        }
        assert!(
            read >= 4,
            "the demo's Services and EndpointSlices are in the subset"
        );
    }

    #[test]
    fn whitespace_yaml_reads_otherwise_is_left_to_serde_yaml() {
        for text in [
            "metadata:\n\u{a0}\u{a0}name: x\n",
            "a: b\u{a0}\n",
            "a: x\r# c\n",
            "a: b\r\n",
            "\u{feff}metadata:\n  name: x\n",
            "a:\n\u{0c}b: c\n",
            "a: b\u{2028}c: d\n",
        ] {
            assert!(parse(text).is_none(), "{text:?} read by the subset reader");
        }
    }

    #[test]
    fn indentation_errors_are_refused() {
        refused("a:\n    b: 1\n  c: 2\n");
        refused("a: 1\n - b\n");
        refused(" a: 1\n");
        refused("a:\n  - b\n   - c\n");
    }
}
