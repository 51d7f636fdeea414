//! One word in any of several fields, made cheap to intersect.
//!
//! A query naming no field searches every text field, so tantivy's parser
//! turns each word into a union: `(title:w OR body:w)`, and a query of two
//! words into the intersection of two such unions. tantivy's union is built
//! for walking every match: it buffers the next 4,096 documents of each
//! field, and an intersection that asks it to skip ahead makes it refill
//! that window again and again, reading nearly every posting of both words.
//!
//! [`AnyField`] is the same union with a cheaper skip: it holds one term
//! scorer per field and moves each with the term's own skip list, so that
//! an intersection costs about the rarer word's postings. Scores are the
//! same sum of the fields' BM25 scores, in the same order.
//! [`rewrite`] puts it in place of the unions of plain term queries that an
//! intersection (or an exclusion) skips through.

use tantivy::query::{
    BooleanQuery, EnableScoring, Explanation, Occur, Query, Scorer, TermQuery, Weight,
};
use tantivy::{DocId, DocSet, Score, SegmentReader, TERMINATED, TantivyError, Term};

/// Replaces each union of term queries (a boolean query of `Should` term
/// clauses only) that is a required or excluded clause of a boolean query
/// with an [`AnyField`]. Those are the unions that get skipped through; a
/// union that is walked from match to match (a one-word query, the clauses
/// of an `OR`) stays tantivy's own, which walks faster.
pub fn rewrite(query: Box<dyn Query>) -> Box<dyn Query> {
    let Some(boolean) = query.downcast_ref::<BooleanQuery>() else {
        return query;
    };
    let mut rewritten = BooleanQuery::new(
        boolean
            .clauses()
            .iter()
            .map(|(occur, q)| {
                let q = match (occur, any_field(q.as_ref())) {
                    (Occur::Must | Occur::MustNot, Some(any)) => Box::new(any),
                    _ => rewrite(q.box_clone()),
                };
                (*occur, q)
            })
            .collect(),
    );
    rewritten.set_minimum_number_should_match(boolean.get_minimum_number_should_match());
    Box::new(rewritten)
}

/// `query` as an [`AnyField`], when it is a union of term queries.
fn any_field(query: &dyn Query) -> Option<AnyField> {
    let boolean = query.downcast_ref::<BooleanQuery>()?;
    let clauses = boolean.clauses();
    if clauses.len() < 2 || boolean.get_minimum_number_should_match() > 1 {
        return None;
    }
    let terms = clauses
        .iter()
        .map(|(occur, q)| {
            (*occur == Occur::Should)
                .then(|| q.downcast_ref::<TermQuery>().cloned())
                .flatten()
        })
        .collect::<Option<Vec<_>>>()?;
    Some(AnyField { terms })
}

/// Documents that match any of the term queries; their score is the sum of
/// the matching ones' scores.
#[derive(Clone, Debug)]
pub struct AnyField {
    terms: Vec<TermQuery>,
}

impl Query for AnyField {
    fn weight(&self, scoring: EnableScoring<'_>) -> tantivy::Result<Box<dyn Weight>> {
        let weights = self
            .terms
            .iter()
            .map(|t| t.weight(scoring))
            .collect::<tantivy::Result<_>>()?;
        Ok(Box::new(AnyFieldWeight { weights }))
    }

    fn query_terms<'a>(&'a self, visitor: &mut dyn FnMut(&'a Term, bool)) {
        for t in &self.terms {
            t.query_terms(visitor);
        }
    }
}

struct AnyFieldWeight {
    weights: Vec<Box<dyn Weight>>,
}

impl Weight for AnyFieldWeight {
    fn scorer(&self, reader: &SegmentReader, boost: Score) -> tantivy::Result<Box<dyn Scorer>> {
        let mut scorers = Vec::with_capacity(self.weights.len());
        for w in &self.weights {
            let s = w.scorer(reader, boost)?;
            if s.doc() != TERMINATED {
                scorers.push(s);
            }
        }
        Ok(Box::new(AnyFieldScorer::new(scorers)))
    }

    fn explain(&self, reader: &SegmentReader, doc: DocId) -> tantivy::Result<Explanation> {
        let mut scorer = self.scorer(reader, 1.0)?;
        if scorer.seek(doc) != doc {
            return Err(TantivyError::InvalidArgument(format!(
                "document {doc} does not match"
            )));
        }
        let mut explanation = Explanation::new("sum of the fields' scores", scorer.score());
        for w in &self.weights {
            if let Ok(e) = w.explain(reader, doc) {
                explanation.add_detail(e);
            }
        }
        Ok(explanation)
    }
}

struct AnyFieldScorer {
    scorers: Vec<Box<dyn Scorer>>,
    doc: DocId,
}

impl AnyFieldScorer {
    fn new(scorers: Vec<Box<dyn Scorer>>) -> Self {
        let doc = scorers.iter().map(|s| s.doc()).min().unwrap_or(TERMINATED);
        Self { scorers, doc }
    }

    fn settle(&mut self) -> DocId {
        self.doc = self
            .scorers
            .iter()
            .map(|s| s.doc())
            .min()
            .unwrap_or(TERMINATED);
        self.doc
    }
}

impl DocSet for AnyFieldScorer {
    fn advance(&mut self) -> DocId {
        let current = self.doc;
        for s in &mut self.scorers {
            if s.doc() == current {
                s.advance();
            }
        }
        self.settle()
    }

    fn seek(&mut self, target: DocId) -> DocId {
        for s in &mut self.scorers {
            if s.doc() < target {
                s.seek(target);
            }
        }
        self.settle()
    }

    fn doc(&self) -> DocId {
        self.doc
    }

    fn size_hint(&self) -> u32 {
        self.scorers
            .iter()
            .fold(0u32, |n, s| n.saturating_add(s.size_hint()))
    }

    fn cost(&self) -> u64 {
        self.scorers.iter().map(|s| s.cost()).sum()
    }
}

impl Scorer for AnyFieldScorer {
    fn score(&mut self) -> Score {
        let doc = self.doc;
        self.scorers
            .iter_mut()
            .filter(|s| s.doc() == doc)
            .map(|s| s.score())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tantivy::collector::{Count, TopDocs};
    use tantivy::query::QueryParser;
    use tantivy::schema::{STORED, Schema, TEXT};
    use tantivy::{Index, TantivyDocument, doc};

    /// Two text fields, documents where words share fields or not.
    fn index() -> (Index, Vec<tantivy::schema::Field>) {
        let mut b = Schema::builder();
        let title = b.add_text_field("title", TEXT | STORED);
        let body = b.add_text_field("body", TEXT);
        let index = Index::create_in_ram(b.build());
        let mut w: tantivy::IndexWriter = index.writer(15_000_000).unwrap();
        let words = [
            "alpha",
            "beta",
            "gamma",
            "delta",
            "alpha beta",
            "beta gamma",
        ];
        for i in 0..600u32 {
            let t = words[(i % 6) as usize];
            let body_text = format!(
                "{} {}",
                words[((i / 6) % 6) as usize],
                words[(i % 5) as usize]
            );
            let d: TantivyDocument = doc!(title => t, body => body_text);
            w.add_document(d).unwrap();
            if i % 200 == 199 {
                w.commit().unwrap();
            }
        }
        w.commit().unwrap();
        (index, vec![title, body])
    }

    #[test]
    fn the_same_documents_and_scores_as_the_union() {
        let (index, fields) = index();
        let mut parser = QueryParser::for_index(&index, fields);
        parser.set_conjunction_by_default();
        let searcher = index.reader().unwrap().searcher();
        for q in [
            "alpha",
            "alpha beta",
            "beta gamma delta",
            "alpha OR delta",
            "alpha -beta",
            "title:alpha body:beta",
            "\"alpha beta\"",
            "zzz alpha",
        ] {
            let parsed = parser.parse_query(q).unwrap();
            let fast = rewrite(parsed.box_clone());
            let top = || TopDocs::with_limit(1000).order_by_score();
            let (a, n_a) = searcher.search(&*parsed, &(top(), Count)).unwrap();
            let (b, n_b) = searcher.search(&*fast, &(top(), Count)).unwrap();
            assert_eq!(n_a, n_b, "{q}: counts");
            let ids = |v: &[(f32, tantivy::DocAddress)]| {
                let mut d: Vec<_> = v
                    .iter()
                    .map(|(s, a)| (a.segment_ord, a.doc_id, *s))
                    .collect();
                d.sort_by_key(|x| (x.0, x.1));
                d
            };
            let (a, b) = (ids(&a), ids(&b));
            assert_eq!(a.len(), b.len(), "{q}: hits");
            for (x, y) in a.iter().zip(&b) {
                assert_eq!((x.0, x.1), (y.0, y.1), "{q}: the same documents");
                assert!((x.2 - y.2).abs() < 1e-5, "{q}: the same scores {x:?} {y:?}");
            }
        }
    }

    #[test]
    fn unions_inside_conjunctions_are_replaced() {
        let (index, fields) = index();
        let mut parser = QueryParser::for_index(&index, fields);
        parser.set_conjunction_by_default();
        let q = rewrite(parser.parse_query("alpha beta").unwrap());
        let text = format!("{q:?}");
        assert_eq!(text.matches("AnyField").count(), 2, "{text}");
        // A single field needs no union; a lone union is walked, not skipped.
        let q = rewrite(parser.parse_query("title:alpha").unwrap());
        assert!(q.downcast_ref::<TermQuery>().is_some());
        let q = rewrite(parser.parse_query("alpha").unwrap());
        assert!(!format!("{q:?}").contains("AnyField"));
        let q = rewrite(parser.parse_query("alpha -beta").unwrap());
        assert_eq!(format!("{q:?}").matches("AnyField").count(), 2);
    }
}
