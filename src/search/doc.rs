//! From an index's config to a tantivy schema, and from a cached JSON value
//! to a tantivy document.
//!
//! Every document has `_key` (the cache key: an exact, stored term, by which
//! it is replaced or deleted). A field marked `facet` also gets a facet
//! field `_facet_<name>` holding `/<value>`.

use tantivy::schema::{
    DateOptions, DateTimePrecision, FAST, Facet, FacetOptions, Field, INDEXED, IndexRecordOption,
    NumericOptions, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::{DateTime, TantivyDocument};

use crate::config::search::{FieldKind, FieldSpec, IndexSpec};

/// The key field's name.
pub const KEY_FIELD: &str = "_key";

/// English stop words: the list Lucene's English analyzer (and tantivy)
/// leaves out.
const ENGLISH_STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
];

/// Registers the tokenizers tandem adds to tantivy's (`english`) with an
/// index; to be called on every index opened or created, before it is
/// written or searched.
pub fn register_tokenizers(index: &tantivy::Index) {
    use tantivy::tokenizer::{
        LowerCaser, RemoveLongFilter, SimpleTokenizer, StopWordFilter, TextAnalyzer,
    };

    use super::stem::CachedEnglishStemmer;
    // Words of at most 40 bytes, lowercased: tantivy's `default`.
    let words = || {
        TextAnalyzer::builder(SimpleTokenizer::default())
            .filter(RemoveLongFilter::limit(40))
            .filter(LowerCaser)
    };
    let english = words()
        .filter(StopWordFilter::remove(
            ENGLISH_STOP_WORDS.iter().map(|w| w.to_string()),
        ))
        .filter(CachedEnglishStemmer)
        .build();
    index.tokenizers().register("english", english);
    // tantivy's own `en_stem`, with the same tokens, stemming remembered.
    let en_stem = words().filter(CachedEnglishStemmer).build();
    index.tokenizers().register("en_stem", en_stem);
}

/// The facet field that goes with a field.
pub fn facet_field_name(field: &str) -> String {
    format!("_facet_{field}")
}

/// The tantivy schema of an index.
pub fn schema(spec: &IndexSpec) -> Schema {
    let mut b = Schema::builder();
    b.add_text_field(KEY_FIELD, STRING | STORED);
    for f in &spec.fields {
        match f.kind {
            FieldKind::Text => {
                let indexing = TextFieldIndexing::default()
                    .set_tokenizer(f.tokenizer.tantivy_name())
                    .set_index_option(IndexRecordOption::WithFreqsAndPositions);
                let mut o = TextOptions::default().set_indexing_options(indexing);
                if f.stored {
                    o = o.set_stored();
                }
                b.add_text_field(&f.name, o);
            }
            FieldKind::String => {
                let mut o = STRING;
                if f.stored {
                    o = o.set_stored();
                }
                if f.fast {
                    o = o.set_fast("raw");
                }
                b.add_text_field(&f.name, o);
            }
            FieldKind::I64 | FieldKind::F64 | FieldKind::Bool => {
                let mut o: NumericOptions = INDEXED.into();
                if f.stored {
                    o = o | STORED;
                }
                if f.fast {
                    o = o | FAST;
                }
                match f.kind {
                    FieldKind::I64 => b.add_i64_field(&f.name, o),
                    FieldKind::F64 => b.add_f64_field(&f.name, o),
                    _ => b.add_bool_field(&f.name, o),
                };
            }
            FieldKind::Date => {
                let mut o = DateOptions::from(INDEXED).set_precision(DateTimePrecision::Seconds);
                if f.stored {
                    o = o.set_stored();
                }
                if f.fast {
                    o = o.set_fast();
                }
                b.add_date_field(&f.name, o);
            }
        }
        if f.facet {
            b.add_facet_field(&facet_field_name(&f.name), FacetOptions::default());
        }
    }
    b.build()
}

/// A value that could not be indexed as a whole.
#[derive(Debug, PartialEq, Eq)]
pub struct NotJson(pub String);

/// A document, and the fields left out because their values had the
/// wrong type.
pub struct Converted {
    pub doc: TantivyDocument,
    pub bad_fields: Vec<String>,
}

/// Fields resolved in a schema, in the spec's order.
pub struct Fields {
    pub key: Field,
    fields: Vec<(FieldSpec, Field, Option<Field>)>,
}

impl Fields {
    pub fn new(spec: &IndexSpec, schema: &Schema) -> Self {
        let get = |name: &str| schema.get_field(name).expect("the schema has every field");
        Self {
            key: get(KEY_FIELD),
            fields: spec
                .fields
                .iter()
                .map(|f| {
                    let facet = f.facet.then(|| get(&facet_field_name(&f.name)));
                    (f.clone(), get(&f.name), facet)
                })
                .collect(),
        }
    }

    /// Turns a cached value into a document.
    pub fn convert(&self, key: &str, value: &[u8]) -> Result<Converted, NotJson> {
        let json: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| NotJson(e.to_string()))?;
        let mut doc = TantivyDocument::default();
        doc.add_text(self.key, key);
        let mut bad_fields = Vec::new();
        for (spec, field, facet) in &self.fields {
            let Some(found) = json.pointer(&spec.pointer) else {
                continue;
            };
            let items: Vec<&serde_json::Value> = match found {
                serde_json::Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            let mut ok = true;
            for item in items {
                if item.is_null() {
                    continue;
                }
                ok &= add_value(&mut doc, spec, *field, *facet, item);
            }
            if !ok {
                bad_fields.push(spec.name.clone());
            }
        }
        Ok(Converted { doc, bad_fields })
    }
}

/// Adds one JSON value to a field; false when it has the wrong type.
fn add_value(
    doc: &mut TantivyDocument,
    spec: &FieldSpec,
    field: Field,
    facet: Option<Field>,
    v: &serde_json::Value,
) -> bool {
    use serde_json::Value as J;
    let as_text = || match v {
        J::String(s) => Some(s.clone()),
        J::Number(n) => Some(n.to_string()),
        J::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let facet_text = match spec.kind {
        FieldKind::Text | FieldKind::String => {
            let Some(t) = as_text() else { return false };
            doc.add_text(field, &t);
            t
        }
        FieldKind::I64 => {
            let n = match v {
                J::Number(n) => n
                    .as_i64()
                    .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
                J::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            let Some(n) = n else { return false };
            doc.add_i64(field, n);
            n.to_string()
        }
        FieldKind::F64 => {
            let n = match v {
                J::Number(n) => n.as_f64(),
                J::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            let Some(n) = n.filter(|f| f.is_finite()) else {
                return false;
            };
            doc.add_f64(field, n);
            n.to_string()
        }
        FieldKind::Bool => {
            let b = match v {
                J::Bool(b) => Some(*b),
                J::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            let Some(b) = b else { return false };
            doc.add_bool(field, b);
            b.to_string()
        }
        FieldKind::Date => {
            let Some(d) = parse_date(v) else { return false };
            doc.add_date(field, d);
            return true;
        }
    };
    if let Some(f) = facet {
        doc.add_facet(f, Facet::from_path([facet_text.as_str()]));
    }
    true
}

/// RFC 3339 text (or a bare date `YYYY-MM-DD`), or Unix seconds.
pub fn parse_date(v: &serde_json::Value) -> Option<DateTime> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().map(DateTime::from_timestamp_secs),
        serde_json::Value::String(s) => parse_date_text(s),
        _ => None,
    }
}

pub fn parse_date_text(s: &str) -> Option<DateTime> {
    let s = s.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(DateTime::from_timestamp_secs(d.timestamp()));
    }
    let day = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(DateTime::from_timestamp_secs(
        day.and_hms_opt(0, 0, 0)?.and_utc().timestamp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::search::Tokenizer;
    use tantivy::schema::Value;

    #[test]
    fn the_english_tokenizer_stems_and_leaves_out_stop_words() {
        let mut spec_field = field("body", FieldKind::Text);
        spec_field.tokenizer = Tokenizer::English;
        let spec = IndexSpec {
            name: "p".into(),
            cache: "p".into(),
            fields: vec![spec_field],
        };
        let index = tantivy::Index::create_in_ram(schema(&spec));
        register_tokenizers(&index);
        let body = index.schema().get_field("body").unwrap();
        let mut w: tantivy::IndexWriter = index.writer(15_000_000).unwrap();
        for text in ["The runner is running to the river", "a quiet stone"] {
            let mut d = TantivyDocument::default();
            d.add_text(body, text);
            w.add_document(d).unwrap();
        }
        w.commit().unwrap();
        let searcher = index.reader().unwrap().searcher();
        let parser = tantivy::query::QueryParser::for_index(&index, vec![body]);
        let count = |q: &str| {
            searcher
                .search(&*parser.parse_query(q).unwrap(), &tantivy::collector::Count)
                .unwrap()
        };
        assert_eq!(count("runs"), 1, "stemmed");
        assert_eq!(count("the"), 0, "a stop word matches nothing");
        assert_eq!(
            count("\"running to the river\""),
            1,
            "phrases skip stop words"
        );
        assert_eq!(count("\"runner river\""), 0, "positions still count");
    }

    fn field(name: &str, kind: FieldKind) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            pointer: format!("/{name}"),
            kind,
            stored: true,
            fast: false,
            facet: false,
            tokenizer: Tokenizer::Default,
        }
    }

    fn spec() -> IndexSpec {
        let mut tag = field("tag", FieldKind::String);
        tag.facet = true;
        tag.pointer = "/meta/tags".into();
        IndexSpec {
            name: "p".into(),
            cache: "p".into(),
            fields: vec![
                field("title", FieldKind::Text),
                tag,
                field("n", FieldKind::I64),
                field("when", FieldKind::Date),
                field("ok", FieldKind::Bool),
            ],
        }
    }

    #[test]
    fn converts_what_it_can() {
        let spec = spec();
        let schema = schema(&spec);
        let fields = Fields::new(&spec, &schema);
        let c = fields
            .convert(
                "k1",
                br#"{"title": "Hello", "meta": {"tags": ["a", "b"]}, "n": "x", "when": "2024-05-01T10:00:00Z", "ok": true}"#,
            )
            .unwrap();
        assert_eq!(c.bad_fields, vec!["n".to_string()]);
        let title = schema.get_field("title").unwrap();
        assert_eq!(c.doc.get_first(title).unwrap().as_str(), Some("Hello"));
        let tag = schema.get_field("tag").unwrap();
        assert_eq!(c.doc.get_all(tag).count(), 2);
        let when = schema.get_field("when").unwrap();
        assert_eq!(
            c.doc
                .get_first(when)
                .unwrap()
                .as_datetime()
                .unwrap()
                .into_timestamp_secs(),
            1_714_557_600
        );
        assert!(fields.convert("k2", b"not json").is_err());
        let empty = fields.convert("k3", b"{}").unwrap();
        assert!(empty.bad_fields.is_empty());
    }

    #[test]
    fn dates() {
        assert!(parse_date_text("2024-05-01").is_some());
        assert!(parse_date_text("yesterday").is_none());
        assert_eq!(
            parse_date(&serde_json::json!(86400))
                .unwrap()
                .into_timestamp_secs(),
            86400
        );
    }
}
