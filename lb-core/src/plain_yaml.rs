//! A reader for the plain subset of YAML that manifests are usually written in, about
//! ten times faster than serde_yaml (libyaml): block mappings and sequences indented
//! with spaces, flow mappings and sequences on one line, plain, single- and
//! double-quoted scalars on one line, comments.
//!
//! It reads a document into a [`serde_json::Value`] only when it is sure to read it as
//! serde_yaml does, and gives up (`None`) at anything else: anchors, aliases, tags,
//! block scalars (`|`, `>`), scalars over several lines, complex keys, a duplicate key,
//! tabs, a plain scalar that YAML could read as a number other than a decimal integer
//! (`1.5`, `0x1f`, `1e3`, `.inf`), a second document. The caller then parses the
//! document with serde_yaml, which also names what is wrong with it.

use serde_json::{Map, Number, Value};

/// The document `text` (with its `---` line, if any) as a JSON value; `None` when it is
/// empty or not in the subset.
pub fn parse(text: &str) -> Option<Value> {
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
    fn block(&mut self) -> Option<Value> {
        let line = self.peek()?;
        if is_item(line.text) {
            self.sequence(line.indent)
        } else {
            self.mapping(line.indent)
        }
    }

    /// A block mapping whose keys are at `indent`.
    fn mapping(&mut self, indent: usize) -> Option<Value> {
        let mut map = Map::new();
        while let Some(line) = self.peek().filter(|l| l.indent == indent) {
            if is_item(line.text) {
                return None; // An item among a mapping's keys.
            }
            let (key, rest) = split_key(line.text)?;
            self.at += 1;
            let value = self.value_after(rest, indent)?;
            if map.insert(key.to_string(), value).is_some() {
                return None; // A duplicate key: serde_yaml refuses it.
            }
        }
        // A deeper line here would continue a scalar over lines, or be misindented.
        if self.peek().is_some_and(|l| l.indent > indent) {
            return None;
        }
        Some(Value::Object(map))
    }

    /// A block sequence whose `-` are at `indent`.
    fn sequence(&mut self, indent: usize) -> Option<Value> {
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
        Some(Value::Array(items))
    }

    /// The value of a key at `indent` whose line goes on with `rest`.
    fn value_after(&mut self, rest: &str, indent: usize) -> Option<Value> {
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
    fn nested(&mut self, indent: usize) -> Option<Value> {
        match self.peek() {
            Some(l) if l.indent > indent => self.block(),
            _ => Some(Value::Null),
        }
    }
}

fn starts_flow_or_quote(s: &str) -> bool {
    s.starts_with(['{', '[', '"', '\''])
}

/// A block mapping entry's plain key and what follows its `:`; `None` when the line is
/// not `key: ...` or `key:` with a plain key.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let (key, rest) = match text.find(": ") {
        Some(i) => (&text[..i], &text[i + 2..]),
        None => (text.strip_suffix(':')?, ""),
    };
    key_ok(key).then_some((key, rest.trim_start()))
}

/// Whether `s` is a plain scalar this reader takes as it is: no indicator first, no
/// `: ` or ` #` inside, nothing that a flow collection would split at.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    !"-?:,[]{}#&*!|>'\"%@`".contains(first)
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.ends_with(':')
        && !s.contains(['{', '}', '[', ']', ','])
        && s.trim() == s
}

/// A value on the rest of a line: flow collection, quoted or plain scalar, and at most a
/// comment after it.
fn inline(s: &str) -> Option<Value> {
    let mut flow = Flow { s, at: 0 };
    let value = if starts_flow_or_quote(s) {
        flow.value()?
    } else {
        // A plain scalar runs to a comment (` #`) or the end of the line.
        let end = s.find(" #").unwrap_or(s.len());
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

    fn value(&mut self) -> Option<Value> {
        self.skip_spaces();
        match self.rest().chars().next()? {
            '{' => self.mapping(),
            '[' => self.sequence(),
            '"' => self.double_quoted().map(Value::String),
            '\'' => self.single_quoted().map(Value::String),
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

    fn mapping(&mut self) -> Option<Value> {
        self.at += 1; // `{`
        let mut map = Map::new();
        if self.eat('}') {
            return Some(Value::Object(map));
        }
        loop {
            self.skip_spaces();
            let rest = self.rest();
            let colon = rest.find(": ")?;
            let key = &rest[..colon];
            if !key_ok(key) {
                return None;
            }
            self.at += colon + 2;
            let value = self.value()?;
            if map.insert(key.to_string(), value).is_some() {
                return None;
            }
            if self.eat('}') {
                return Some(Value::Object(map));
            }
            if !self.eat(',') || self.eat('}') {
                return None; // A trailing comma: left to serde_yaml.
            }
        }
    }

    fn sequence(&mut self) -> Option<Value> {
        self.at += 1; // `[`
        let mut items = Vec::new();
        if self.eat(']') {
            return Some(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            if self.eat(']') {
                return Some(Value::Array(items));
            }
            if !self.eat(',') || self.eat(']') {
                return None;
            }
        }
    }

    /// `"..."` on one line with the escapes `\\ \" \/ \n \t`.
    fn double_quoted(&mut self) -> Option<String> {
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.at += i + 1;
                    return Some(out);
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
    fn single_quoted(&mut self) -> Option<String> {
        let rest = self.rest();
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
                return Some(out);
            }
        }
    }
}

/// What a plain scalar is as YAML 1.2's core schema (serde_yaml's) resolves it.
enum Plain {
    Str,
    Other(Value),
}

/// Resolves a plain scalar: null, boolean, decimal integer or string; `None` for what
/// this reader does not take (floats, other bases, signs, leading zeros, indicators).
fn resolve(s: &str) -> Option<Plain> {
    let negative = s.len() > 1 && s.starts_with('-') && !s.starts_with("- ");
    if !(plain_ok(s) || negative && plain_ok(&s[1..])) {
        return None;
    }
    Some(match s {
        "null" | "Null" | "NULL" | "~" => Plain::Other(Value::Null),
        "true" | "True" | "TRUE" => Plain::Other(Value::Bool(true)),
        "false" | "False" | "FALSE" => Plain::Other(Value::Bool(false)),
        _ => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                if digits.len() > 1 && digits.starts_with('0') || s == "-0" {
                    return None;
                }
                let n = Number::from(s.parse::<i64>().ok()?);
                return Some(Plain::Other(Value::Number(n)));
            }
            if s.starts_with(['+', '.', '-']) || could_be_number(s) {
                return None;
            }
            Plain::Str
        }
    })
}

/// A plain scalar's value; `None` when [`resolve`] refuses it.
fn plain(s: &str) -> Option<Value> {
    Some(match resolve(s)? {
        Plain::Str => Value::String(s.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What serde_yaml reads `text` as, in JSON.
    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    /// The subset reader reads `text` as serde_yaml does.
    #[track_caller]
    fn same(text: &str) {
        let ours = parse(text).unwrap_or_else(|| panic!("not read: {text}"));
        assert_eq!(ours, yaml(text), "{text}");
    }

    #[track_caller]
    fn refused(text: &str) {
        assert_eq!(parse(text), None, "{text}");
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
                let Some(ours) = parse(doc) else { continue };
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
    fn indentation_errors_are_refused() {
        refused("a:\n    b: 1\n  c: 2\n");
        refused("a: 1\n - b\n");
        refused(" a: 1\n");
        refused("a:\n  - b\n   - c\n");
    }
}
