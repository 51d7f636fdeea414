//! English stemming that remembers the stems it has computed.
//!
//! Stemming is about a third of the CPU time of indexing English text (the
//! Snowball algorithm runs on every word), while a text's words repeat: a
//! few thousand distinct words make up most of any document set. This
//! filter gives the same tokens as tantivy's `Stemmer::new(English)`, and
//! looks each word up in a table first. Each analyzer (one per text field
//! of a segment being written) keeps its own table, so there is no lock;
//! the table stops growing at [`MAX_WORDS`] words, the frequent ones being
//! met first.

use foldhash::HashMap;
use frostem::{Algorithm, Stemmer};
use tantivy::tokenizer::{Token, TokenFilter, TokenStream, Tokenizer};

/// Words remembered per analyzer (about 100 bytes each).
const MAX_WORDS: usize = 32_768;

/// The token filter: English stemming, remembered.
#[derive(Clone, Copy, Debug, Default)]
pub struct CachedEnglishStemmer;

impl TokenFilter for CachedEnglishStemmer {
    type Tokenizer<T: Tokenizer> = StemmingTokenizer<T>;

    fn transform<T: Tokenizer>(self, inner: T) -> StemmingTokenizer<T> {
        StemmingTokenizer {
            inner,
            stemmer: Stemmer::new(Algorithm::English),
            stems: HashMap::default(),
        }
    }
}

#[derive(Clone)]
pub struct StemmingTokenizer<T> {
    inner: T,
    stemmer: Stemmer,
    /// Word → stem, for the words stemming changes (the others map to
    /// themselves and are kept as an empty stem).
    stems: HashMap<String, String>,
}

impl<T: Tokenizer> Tokenizer for StemmingTokenizer<T> {
    type TokenStream<'a> = StemmingStream<'a, T::TokenStream<'a>>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> Self::TokenStream<'a> {
        StemmingStream {
            tail: self.inner.token_stream(text),
            stemmer: self.stemmer,
            stems: &mut self.stems,
        }
    }
}

pub struct StemmingStream<'a, T> {
    tail: T,
    stemmer: Stemmer,
    stems: &'a mut HashMap<String, String>,
}

impl<T: TokenStream> TokenStream for StemmingStream<'_, T> {
    fn advance(&mut self) -> bool {
        if !self.tail.advance() {
            return false;
        }
        let token = self.tail.token_mut();
        let stem = match self.stems.get(token.text.as_str()) {
            Some(stem) => stem,
            None => {
                let stem = match self.stemmer.stem(&token.text) {
                    s if *s == token.text => String::new(),
                    s => s.into_owned(),
                };
                if self.stems.len() >= MAX_WORDS {
                    if !stem.is_empty() {
                        token.text = stem;
                    }
                    return true;
                }
                self.stems.entry(token.text.clone()).or_insert(stem)
            }
        };
        if !stem.is_empty() {
            token.text.clear();
            token.text.push_str(stem);
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
    use tantivy::tokenizer::{
        Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, TextAnalyzer,
    };

    use super::*;

    fn tokens(analyzer: &mut TextAnalyzer, text: &str) -> Vec<(String, usize, usize, usize)> {
        let mut out = Vec::new();
        analyzer.token_stream(text).process(&mut |t: &Token| {
            out.push((t.text.clone(), t.position, t.offset_from, t.offset_to));
        });
        out
    }

    #[test]
    fn same_tokens_as_tantivys_stemmer() {
        let builder = || TextAnalyzer::builder(SimpleTokenizer::default()).filter(LowerCaser);
        let mut plain = builder().filter(Stemmer::new(Language::English)).build();
        let mut cached = builder().filter(CachedEnglishStemmer).build();
        let text = "Running runners ran; the indexes indexed INDEXING. Dogs, dog's \
                    generalizations caresses ponies cats running generously";
        // Twice: the second pass answers from the table.
        for _ in 0..2 {
            assert_eq!(tokens(&mut cached, text), tokens(&mut plain, text));
        }
        let long = "x".repeat(50) + " running " + &"y".repeat(45);
        let mut a = builder()
            .filter(RemoveLongFilter::limit(40))
            .filter(CachedEnglishStemmer)
            .build();
        assert_eq!(tokens(&mut a, &long), vec![("run".to_string(), 1, 51, 58)]);
    }

    #[test]
    fn a_full_table_still_stems() {
        let builder = || TextAnalyzer::builder(SimpleTokenizer::default());
        let mut plain = builder().filter(Stemmer::new(Language::English)).build();
        let mut cached = builder().filter(CachedEnglishStemmer).build();
        let words: String = (0..MAX_WORDS + 10)
            .map(|i| format!("cat{i}s running{i} "))
            .collect();
        let got = tokens(&mut cached, &words);
        assert_eq!(got.len(), 2 * (MAX_WORDS + 10));
        assert_eq!(got, tokens(&mut plain, &words));
        assert_eq!(tokens(&mut cached, "cats running")[1].0, "run");
    }
}
