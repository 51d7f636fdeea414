//! Answering a search against an index's live reader: tantivy's query
//! syntax (all terms required unless `OR` is written), exact filters,
//! sorting on fast fields, facet counts, highlighted snippets.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value as Json};
use tantivy::collector::{Count, FacetCollector, MultiCollector, TopDocs};
use tantivy::query::{AllQuery, BooleanQuery, ConstScoreQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, FieldType, IndexRecordOption, Schema, Value};
use tantivy::snippet::SnippetGenerator;
use tantivy::{DocAddress, Order, Searcher, TantivyDocument, Term};

use super::doc::{KEY_FIELD, facet_field_name, parse_date_text};
use super::{Live, SearchIndex};

/// A search, as asked.
#[derive(Debug, Default, Clone)]
pub struct Request {
    pub q: String,
    pub limit: usize,
    pub offset: usize,
    /// `field:value` pairs, each required exactly.
    pub filters: Vec<(String, String)>,
    pub sort: Option<(String, Order)>,
    /// Whether to build snippets (default true).
    pub highlight: bool,
    /// The stored fields to return (`None`: all).
    pub fields: Option<Vec<String>>,
    /// The facet fields to count (`None`: every one the index has).
    pub facets: Option<Vec<String>>,
}

/// Snippets are made from at most this much of a field's text: a window
/// around the first place a query term appears, else its start. (Making a
/// snippet tokenizes and stems its source, the costliest part of a search.)
const SNIPPET_SOURCE_BYTES: usize = 640;

/// Where, roughly, a snippet's source should start: a little before the
/// first ASCII-case-insensitive occurrence of any of `terms` at the start of
/// a word (stems are usually prefixes of the words they come from).
fn snippet_window<'t>(text: &'t str, terms: &[String]) -> &'t str {
    let hay = text.as_bytes();
    let word_start = |i: usize| i == 0 || !hay[i - 1].is_ascii_alphanumeric();
    let first = terms
        .iter()
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            let n = t.as_bytes();
            hay.windows(n.len())
                .enumerate()
                .position(|(i, w)| w.eq_ignore_ascii_case(n) && word_start(i))
        })
        .min()
        .unwrap_or(0);
    let mut start = first.saturating_sub(SNIPPET_SOURCE_BYTES / 5);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + SNIPPET_SOURCE_BYTES).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[start..end]
}

#[cfg(test)]
mod tests {
    use super::snippet_window;

    #[test]
    fn snippet_windows() {
        let text = format!("{}Running late{}", "x ".repeat(2000), " y".repeat(2000));
        let w = snippet_window(&text, &["run".into()]);
        assert!(w.contains("Running late"));
        assert!(w.len() <= super::SNIPPET_SOURCE_BYTES);
        // No occurrence: the start.
        assert!(snippet_window(&text, &["zzz".into()]).starts_with("x x"));
        // Inside another word does not count.
        let text = format!("brunch {}Running", "x ".repeat(2000));
        assert!(snippet_window(&text, &["run".into()]).contains("Running"));
        // Never splits a character.
        let text = "é".repeat(3000);
        assert!(
            snippet_window(&text, &["é".into()])
                .chars()
                .all(|c| c == 'é')
        );
    }
}

#[derive(Debug, Serialize)]
pub struct Hit {
    pub key: String,
    /// BM25 score; absent when sorted by a field.
    pub score: Option<f32>,
    pub fields: Map<String, Json>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub snippets: Map<String, Json>,
}

#[derive(Debug, Serialize)]
pub struct Answer {
    pub total: usize,
    pub hits: Vec<Hit>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub facets: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Why a search was not answered.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the index has no searchable version yet (it is being built)")]
    Building,
    #[error("{0}")]
    Internal(String),
}

impl From<tantivy::TantivyError> for SearchError {
    fn from(e: tantivy::TantivyError) -> Self {
        SearchError::Internal(e.to_string())
    }
}

/// The fields a query searches when it names none: every tokenized text
/// field.
pub fn default_fields(schema: &Schema) -> Vec<Field> {
    schema
        .fields()
        .filter(|(_, e)| match e.field_type() {
            FieldType::Str(o) => o
                .get_indexing_options()
                .is_some_and(|i| i.tokenizer() != "raw"),
            _ => false,
        })
        .map(|(f, _)| f)
        .collect()
}

fn user_field(schema: &Schema, name: &str) -> Result<Field, SearchError> {
    if name.starts_with('_') {
        return Err(SearchError::BadRequest(format!("no field {name:?}")));
    }
    schema
        .get_field(name)
        .map_err(|_| SearchError::BadRequest(format!("no field {name:?} in this index")))
}

/// An exact term for `field:value`.
fn filter_term(schema: &Schema, name: &str, value: &str) -> Result<Term, SearchError> {
    let field = user_field(schema, name)?;
    let bad = |what: &str| SearchError::BadRequest(format!("filter {name}:{value}: {what}"));
    let entry = schema.get_field_entry(field);
    if !entry.is_indexed() {
        return Err(bad("the field is not indexed"));
    }
    Ok(match entry.field_type() {
        FieldType::Str(o) => {
            let raw = o
                .get_indexing_options()
                .is_some_and(|i| i.tokenizer() == "raw");
            if !raw {
                return Err(bad(
                    "filters match whole values of string, number, date and bool fields; search text fields with q",
                ));
            }
            Term::from_field_text(field, value)
        }
        FieldType::I64(_) => Term::from_field_i64(
            field,
            value.trim().parse().map_err(|_| bad("not an integer"))?,
        ),
        FieldType::F64(_) => Term::from_field_f64(
            field,
            value.trim().parse().map_err(|_| bad("not a number"))?,
        ),
        FieldType::Bool(_) => Term::from_field_bool(
            field,
            value.trim().parse().map_err(|_| bad("not true or false"))?,
        ),
        FieldType::Date(_) => Term::from_field_date_for_search(
            field,
            parse_date_text(value).ok_or_else(|| bad("not an RFC 3339 date"))?,
        ),
        _ => return Err(bad("this field cannot be filtered")),
    })
}

/// The longest query text accepted, in bytes.
const MAX_QUERY_LEN: usize = 4096;
/// The most groups and `NOT`s a query may hold: the query parser recurses
/// once for each, on a thread with a fixed stack, so a query nested
/// thousands deep would overflow it and abort the process.
const MAX_QUERY_NESTING: usize = 64;

/// Refuses query text too long or too deeply nested to parse safely.
fn check_query_text(q: &str) -> Result<(), SearchError> {
    if q.len() > MAX_QUERY_LEN {
        return Err(SearchError::BadRequest(format!(
            "the query is longer than {MAX_QUERY_LEN} bytes"
        )));
    }
    let groups = q.matches('(').count();
    let nots = q
        .split(|c: char| c.is_whitespace() || c == '(')
        .filter(|w| *w == "NOT")
        .count();
    if groups + nots > MAX_QUERY_NESTING {
        return Err(SearchError::BadRequest(format!(
            "the query holds more than {MAX_QUERY_NESTING} groups and NOTs"
        )));
    }
    Ok(())
}

fn build_query(live: &Live, req: &Request) -> Result<Box<dyn Query>, SearchError> {
    let schema = live.index.schema();
    let q = req.q.trim();
    check_query_text(q)?;
    let main: Box<dyn Query> = if q.is_empty() || q == "*" {
        Box::new(AllQuery)
    } else {
        super::anyfield::rewrite(
            live.parser
                .parse_query(q)
                .map_err(|e| SearchError::BadRequest(format!("bad query: {e}")))?,
        )
    };
    if req.filters.is_empty() {
        return Ok(main);
    }
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, main)];
    for (name, value) in &req.filters {
        let term = filter_term(&schema, name, value)?;
        let tq = TermQuery::new(term, IndexRecordOption::Basic);
        clauses.push((
            Occur::Must,
            Box::new(ConstScoreQuery::new(Box::new(tq), 0.0)),
        ));
    }
    Ok(Box::new(BooleanQuery::new(clauses)))
}

type Ranked = Vec<(Option<f32>, DocAddress)>;
type FacetCounts = BTreeMap<String, BTreeMap<String, u64>>;
type TakeSorted = Box<dyn FnOnce(&mut tantivy::collector::MultiFruit) -> Vec<DocAddress>>;

/// The top documents, by score or by a fast field.
fn top_docs(
    searcher: &Searcher,
    schema: &Schema,
    query: &dyn Query,
    req: &Request,
    facets: &[(String, Field)],
) -> Result<(usize, Ranked, FacetCounts), SearchError> {
    let mut multi = MultiCollector::new();
    let count = multi.add_collector(Count);
    let facet_handles: Vec<_> = facets
        .iter()
        .map(|(name, f)| {
            let mut c = FacetCollector::for_field(schema.get_field_name(*f));
            c.add_facet("/");
            (name.clone(), multi.add_collector(c))
        })
        .collect();
    let top = TopDocs::with_limit(req.limit.max(1)).and_offset(req.offset);
    enum Handle {
        Score(tantivy::collector::FruitHandle<Vec<(f32, DocAddress)>>),
        Sorted(TakeSorted),
    }
    let handle = match &req.sort {
        None => Handle::Score(multi.add_collector(top.order_by_score())),
        Some((name, order)) => {
            let field = user_field(schema, name)?;
            let entry = schema.get_field_entry(field);
            if !entry.is_fast() {
                return Err(SearchError::BadRequest(format!(
                    "sort={name}: the field is not fast (set fast = true in its config)"
                )));
            }
            let name = name.clone();
            let order = *order;
            macro_rules! sorted {
                ($c:expr) => {{
                    let h = multi.add_collector($c);
                    Handle::Sorted(Box::new(move |f| {
                        h.extract(f).into_iter().map(|(_, a)| a).collect()
                    }))
                }};
            }
            match entry.field_type() {
                FieldType::I64(_) => sorted!(top.order_by_fast_field::<i64>(name, order)),
                FieldType::F64(_) => sorted!(top.order_by_fast_field::<f64>(name, order)),
                FieldType::Bool(_) => sorted!(top.order_by_fast_field::<bool>(name, order)),
                FieldType::Date(_) => {
                    sorted!(top.order_by_fast_field::<tantivy::DateTime>(name, order))
                }
                FieldType::Str(_) => sorted!(top.order_by_string_fast_field(name, order)),
                _ => {
                    return Err(SearchError::BadRequest(format!(
                        "sort={name}: this field cannot be sorted"
                    )));
                }
            }
        }
    };
    let mut fruits = searcher.search(query, &multi)?;
    let total = count.extract(&mut fruits);
    let mut facet_counts = BTreeMap::new();
    for (name, h) in facet_handles {
        let counts = h.extract(&mut fruits);
        let values = counts
            .top_k("/", 100)
            .into_iter()
            .map(|(facet, n)| {
                let text = facet
                    .to_path()
                    .last()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                (text, n)
            })
            .collect();
        facet_counts.insert(name, values);
    }
    let ranked = match handle {
        Handle::Score(h) => h
            .extract(&mut fruits)
            .into_iter()
            .map(|(s, a)| (Some(s), a))
            .collect(),
        Handle::Sorted(f) => f(&mut fruits).into_iter().map(|a| (None, a)).collect(),
    };
    let ranked = if req.limit == 0 { Vec::new() } else { ranked };
    Ok((total, ranked, facet_counts))
}

/// A stored value as JSON.
fn to_json<'a>(v: impl Value<'a>) -> Json {
    if let Some(s) = v.as_str() {
        return Json::String(s.to_string());
    }
    if let Some(n) = v.as_i64() {
        return Json::from(n);
    }
    if let Some(n) = v.as_f64() {
        return serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number);
    }
    if let Some(b) = v.as_bool() {
        return Json::Bool(b);
    }
    if let Some(d) = v.as_datetime() {
        let secs = d.into_timestamp_secs();
        return chrono::DateTime::from_timestamp(secs, 0)
            .map_or(Json::Null, |d| Json::String(d.to_rfc3339()));
    }
    Json::Null
}

/// Runs a search.
pub fn run(ix: &SearchIndex, req: &Request) -> Result<Answer, SearchError> {
    let live = ix.live().ok_or(SearchError::Building)?;
    let schema = live.index.schema();
    let query = build_query(&live, req)?;
    let searcher = live.reader.searcher();
    if let Some(asked) = &req.facets
        && let Some(bad) = asked
            .iter()
            .find(|name| !ix.spec.fields.iter().any(|f| f.facet && &f.name == *name))
    {
        return Err(SearchError::BadRequest(format!(
            "facets={bad}: not a facet field of this index (mark it facet = true in its config)"
        )));
    }
    let facets: Vec<(String, Field)> = ix
        .spec
        .fields
        .iter()
        .filter(|f| f.facet)
        .filter(|f| req.facets.as_ref().is_none_or(|a| a.contains(&f.name)))
        .filter_map(|f| {
            schema
                .get_field(&facet_field_name(&f.name))
                .ok()
                .map(|field| (f.name.clone(), field))
        })
        .collect();
    let (total, ranked, facets) = top_docs(&searcher, &schema, &*query, req, &facets)?;
    let key_field = schema.get_field(KEY_FIELD)?;
    let mut snippets: Vec<(Field, String, Vec<String>, SnippetGenerator)> = Vec::new();
    if req.highlight && !ranked.is_empty() && !req.q.trim().is_empty() {
        // Only the stored text fields the query has terms in.
        let mut queried: BTreeMap<Field, Vec<String>> = BTreeMap::new();
        query.query_terms(&mut |term, _| {
            if let Some(text) = term.value().as_str() {
                queried
                    .entry(term.field())
                    .or_default()
                    .push(text.to_string());
            }
        });
        for &field in &live.text_fields {
            let Some(terms) = queried.remove(&field) else {
                continue;
            };
            if !schema.get_field_entry(field).is_stored() {
                continue;
            }
            if let Some(g) = super::highlight::generator(&searcher, &schema, &*query, field)? {
                snippets.push((field, schema.get_field_name(field).to_string(), terms, g));
            }
        }
    }
    let wanted = |name: &str| {
        req.fields
            .as_ref()
            .is_none_or(|f| f.iter().any(|w| w == name))
    };
    let mut hits = Vec::with_capacity(ranked.len());
    for (score, addr) in ranked {
        let doc: TantivyDocument = searcher.doc(addr)?;
        let mut key = String::new();
        let mut fields = Map::new();
        for (field, value) in doc.field_values() {
            if field == key_field {
                key = value.as_str().unwrap_or_default().to_string();
                continue;
            }
            let name = schema.get_field_name(field);
            if name.starts_with('_') || !wanted(name) {
                continue;
            }
            let v = to_json(value);
            match fields.get_mut(name) {
                None => {
                    fields.insert(name.to_string(), v);
                }
                Some(Json::Array(a)) => a.push(v),
                Some(prev) => {
                    let first = prev.take();
                    *prev = Json::Array(vec![first, v]);
                }
            }
        }
        let mut hit_snippets = Map::new();
        for (field, name, terms, g) in &snippets {
            let Some(text) = doc.get_first(*field).and_then(|v| v.as_str()) else {
                continue;
            };
            let s = g.snippet(snippet_window(text, terms));
            if !s.is_empty() {
                hit_snippets.insert(name.clone(), Json::String(s.to_html()));
            }
        }
        hits.push(Hit {
            key,
            score,
            fields,
            snippets: hit_snippets,
        });
    }
    Ok(Answer {
        total,
        hits,
        facets,
    })
}
