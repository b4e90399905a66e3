//! Masking: all but the last characters replaced by `*`.

/// Replaces all but the last `keep_last` characters (not bytes) by `*`, keeping the length in characters.
/// A value no longer than `keep_last` is masked whole: showing all of it would be no mask at all.
pub fn mask(value: &str, keep_last: usize) -> String {
    let (hidden, tail) = mask_split(value, keep_last);
    let mut out = String::with_capacity(hidden + value.len() - tail);
    out.extend(std::iter::repeat_n('*', hidden));
    out.push_str(&value[tail..]);
    out
}

/// How many `*` a masked value starts with, and the byte index where its kept tail begins.
pub(crate) fn mask_split(value: &str, keep_last: usize) -> (usize, usize) {
    let chars = value.chars().count();
    let hidden = if chars <= keep_last { chars } else { chars - keep_last };
    let tail = value.char_indices().nth(hidden).map_or(value.len(), |(i, _)| i);
    (hidden, tail)
}

#[cfg(test)]
mod tests {
    use super::mask;

    #[test]
    fn keeps_the_last_characters() {
        assert_eq!(mask("4111111111111111", 4), "************1111");
        assert_eq!(mask("+44 20 7946 0958", 2), "**************58");
        assert_eq!(mask("abc", 0), "***");
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert_eq!(mask("Zoë Ørsted", 3), "*******ted");
        assert_eq!(mask("日本語テキスト", 2), "*****スト");
    }

    #[test]
    fn short_values_are_masked_whole() {
        assert_eq!(mask("1234", 4), "****");
        assert_eq!(mask("12", 4), "**");
        assert_eq!(mask("", 4), "");
    }
}
