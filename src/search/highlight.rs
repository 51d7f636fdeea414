//! Snippets, made cheaper: tantivy's snippet generator tokenizes (and, for
//! `en_stem` fields, stems) the text it highlights, and stemming every word
//! of every hit was the largest cost of a search. A word can only stem to a
//! query term if it starts with the term's first two letters (English
//! stemming rewrites endings only), so the analyzer used for snippets blanks
//! every other word before the stemmer sees it. The highlighted words are
//! exactly those tantivy's own generator would pick.

use std::collections::{BTreeMap, BTreeSet};

use tantivy::query::Query;
use tantivy::schema::{Field, FieldType, Schema};
use tantivy::snippet::SnippetGenerator;
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, TextAnalyzer, Token,
    TokenFilter, TokenStream, Tokenizer,
};
use tantivy::{Searcher, Term};

/// Longest snippet, in characters.
const MAX_CHARS: usize = 200;

/// A snippet generator for `field`, or `None` when the query has no term in
/// it.
pub fn generator(
    searcher: &Searcher,
    schema: &Schema,
    query: &dyn Query,
    field: Field,
) -> tantivy::Result<Option<SnippetGenerator>> {
    let mut terms: BTreeSet<Term> = BTreeSet::new();
    query.query_terms(&mut |term, _| {
        if term.field() == field {
            terms.insert(term.clone());
        }
    });
    let mut scored: BTreeMap<String, f32> = BTreeMap::new();
    for term in &terms {
        let value = term.value();
        let Some(text) = value.as_str() else {
            continue;
        };
        let df = searcher.doc_freq(term)?;
        if df > 0 {
            scored.insert(text.to_string(), 1.0 / (1.0 + df as f32));
        }
    }
    if scored.is_empty() {
        return Ok(None);
    }
    let stemmed = match schema.get_field_entry(field).field_type() {
        FieldType::Str(o) => o
            .get_indexing_options()
            .is_some_and(|i| matches!(i.tokenizer(), "en_stem" | "english")),
        _ => false,
    };
    let analyzer = if stemmed {
        let prefixes = scored
            .keys()
            .map(|t| t.chars().take(2).collect::<String>())
            .collect();
        TextAnalyzer::builder(SimpleTokenizer::default())
            .filter(RemoveLongFilter::limit(40))
            .filter(LowerCaser)
            .filter(Gate { prefixes })
            .filter(Stemmer::new(Language::English))
            .build()
    } else {
        searcher.index().tokenizer_for_field(field)?
    };
    Ok(Some(SnippetGenerator::new(
        scored, analyzer, field, MAX_CHARS,
    )))
}

/// Blanks the words that cannot stem to a query term.
#[derive(Clone)]
struct Gate {
    prefixes: Vec<String>,
}

impl TokenFilter for Gate {
    type Tokenizer<T: Tokenizer> = GateTokenizer<T>;

    fn transform<T: Tokenizer>(self, inner: T) -> GateTokenizer<T> {
        GateTokenizer {
            prefixes: self.prefixes,
            inner,
        }
    }
}

#[derive(Clone)]
struct GateTokenizer<T> {
    prefixes: Vec<String>,
    inner: T,
}

impl<T: Tokenizer> Tokenizer for GateTokenizer<T> {
    type TokenStream<'a> = GateStream<'a, T::TokenStream<'a>>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> Self::TokenStream<'a> {
        GateStream {
            prefixes: &self.prefixes,
            tail: self.inner.token_stream(text),
        }
    }
}

struct GateStream<'a, T> {
    prefixes: &'a [String],
    tail: T,
}

impl<T: TokenStream> TokenStream for GateStream<'_, T> {
    fn advance(&mut self) -> bool {
        if !self.tail.advance() {
            return false;
        }
        let token = self.tail.token_mut();
        if !self
            .prefixes
            .iter()
            .any(|p| token.text.starts_with(p.as_str()))
        {
            token.text.clear();
        }
        true
    }

    fn token(&self) -> &Token {
        self.tail.token()
    }

    fn token_mut(&mut self) -> &mut Token {
        self.tail.token_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tantivy::schema::{IndexRecordOption, TextFieldIndexing, TextOptions};
    use tantivy::{Index, TantivyDocument};

    #[test]
    fn highlights_what_tantivy_would() {
        let mut b = Schema::builder();
        let indexing = TextFieldIndexing::default()
            .set_tokenizer("en_stem")
            .set_index_option(IndexRecordOption::WithFreqsAndPositions);
        let body = b.add_text_field(
            "body",
            TextOptions::default()
                .set_indexing_options(indexing)
                .set_stored(),
        );
        let schema = b.build();
        let index = Index::create_in_ram(schema.clone());
        let mut w = index.writer_with_num_threads(1, 20_000_000).unwrap();
        let text = "Happy people keep running; a runner runs. Running water is happiness.";
        let mut doc = TantivyDocument::default();
        doc.add_text(body, text);
        w.add_document(doc).unwrap();
        w.commit().unwrap();
        let searcher = index.reader().unwrap().searcher();
        let parser = tantivy::query::QueryParser::for_index(&index, vec![body]);
        for q in ["running", "happy", "\"running water\""] {
            let query = parser.parse_query(q).unwrap();
            let ours = generator(&searcher, &schema, &*query, body)
                .unwrap()
                .unwrap()
                .snippet(text)
                .to_html();
            let mut theirs = SnippetGenerator::create(&searcher, &*query, body).unwrap();
            theirs.set_max_num_chars(MAX_CHARS);
            assert_eq!(ours, theirs.snippet(text).to_html(), "{q}");
            assert!(ours.contains("<b>"), "{q}: {ours}");
        }
        let query = parser.parse_query("zebra").unwrap();
        assert!(
            generator(&searcher, &schema, &*query, body)
                .unwrap()
                .is_none()
        );
    }
}
