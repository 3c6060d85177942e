//! Text chunks for the text collection: `size` words per chunk, `overlap` words shared with the
//! previous chunk, per page (a chunk never spans two pages), numbered across the document.

/// One chunk of a page's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextChunk {
    /// 1-based page the chunk comes from.
    pub page: u32,
    /// 0-based, unique across the document.
    pub chunk_index: u32,
    /// The chunk's words joined by single spaces (at most `max_chars` characters).
    pub text: String,
    pub word_count: usize,
}

/// Chunks one page's text: `size` words with `overlap` words shared; chunk_index numbering
/// starts at `first_index`. A page without words gives no chunks. `overlap` is held below
/// `size` so the window always moves; a chunk longer than `max_chars` characters (a run of
/// huge "words", e.g. an embedded blob) is cut at `max_chars`.
pub fn chunk_page(
    page: u32,
    text: &str,
    size: usize,
    overlap: usize,
    max_chars: usize,
    first_index: u32,
) -> Vec<TextChunk> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let size = size.max(1);
    let step = size - overlap.min(size - 1);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < words.len() {
        let end = (start + size).min(words.len());
        let mut text = words[start..end].join(" ");
        if text.chars().count() > max_chars.max(1) {
            let cut = text
                .char_indices()
                .nth(max_chars.max(1))
                .map_or(text.len(), |(i, _)| i);
            text.truncate(cut);
        }
        let word_count = text.split_whitespace().count();
        chunks.push(TextChunk {
            page,
            chunk_index: first_index + chunks.len() as u32,
            text,
            word_count,
        });
        if end == words.len() {
            break;
        }
        start += step;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> String {
        (0..n)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn windows_overlap_and_cover_every_word() {
        let c = chunk_page(3, &words(600), 250, 50, 20_000, 7);
        // starts at 0, 200, 400; the last one reaches the end.
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.iter().map(|c| c.chunk_index).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        assert!(c.iter().all(|c| c.page == 3));
        assert_eq!(c[0].word_count, 250);
        assert!(c[0].text.starts_with("w0 ") && c[0].text.ends_with(" w249"));
        assert!(c[1].text.starts_with("w200 ") && c[1].text.ends_with(" w449"));
        assert!(c[2].text.starts_with("w400 ") && c[2].text.ends_with(" w599"));
        assert_eq!(c[2].word_count, 200);
    }

    #[test]
    fn short_and_empty_pages() {
        assert!(chunk_page(1, " \n\t ", 250, 50, 100, 0).is_empty());
        let c = chunk_page(1, "one\ntwo  three", 250, 50, 100, 0);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].text.as_str(), c[0].word_count), ("one two three", 3));
        // Exactly `size` words: one chunk, no tail made only of overlap.
        assert_eq!(chunk_page(1, &words(250), 250, 50, 20_000, 0).len(), 1);
    }

    #[test]
    fn overlap_not_below_size_still_advances() {
        let c = chunk_page(1, &words(5), 2, 9, 100, 0);
        assert_eq!(
            c.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(),
            vec!["w0 w1", "w1 w2", "w2 w3", "w3 w4"]
        );
    }

    #[test]
    fn long_chunks_are_cut_at_a_char_boundary() {
        let text = "é".repeat(50);
        let c = chunk_page(1, &text, 10, 2, 8, 0);
        assert_eq!(c[0].text, "é".repeat(8));
    }
}
