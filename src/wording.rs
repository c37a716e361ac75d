//! How a problem in an operator's file is worded: the same words for the
//! same kind of mistake in the gateway file and the rules file, and types
//! named as a person would name them ("a whole number", not `u32`).
//!
//! serde and figment describe a wrong value as "invalid type: string
//! \"three\", expected u32"; the functions here turn that into
//! `found the text "three", expected a whole number`.

/// A type serde names (`u32`, `a boolean`, `struct X`), in plain words.
pub fn expected(serde: &str) -> String {
    let t = serde
        .trim()
        .trim_start_matches("a ")
        .trim_start_matches("an ");
    let plain = match t {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "i8" | "i16" | "i32" | "i64" | "i128"
        | "isize" | "integer" => "a whole number",
        "f32" | "f64" | "float" | "floating point" => "a number",
        "bool" | "boolean" => "true or false",
        "string" | "str" | "char" | "path" => "text in quotes",
        "sequence" | "seq" | "list" => "a list",
        "map" | "table" => "a table",
        _ if t.starts_with("struct ") || t.starts_with("map ") => "a table",
        _ if t.starts_with("sequence") => "a list",
        _ => return serde.trim().to_owned(),
    };
    plain.to_owned()
}

/// A value serde or figment found (`string "three"`, `signed int \`5\``),
/// in plain words.
pub fn found(serde: &str) -> String {
    let s = serde.trim();
    let (kind, value) = match s.find([' ', '`', '"']) {
        Some(i) => (s[..i].trim(), s[i..].trim()),
        None => (s, ""),
    };
    let value = value.trim_matches('`');
    match kind {
        "string" | "str" | "char" => format!("the text {value}"),
        "integer" | "int" | "signed" | "unsigned" => {
            let digits = value.trim_start_matches("int").trim().trim_matches('`');
            format!("the number {digits}")
        }
        "floating" | "float" => {
            let digits = value.trim_start_matches("point").trim().trim_matches('`');
            format!("the number {digits}")
        }
        "boolean" | "bool" => value.to_owned(),
        "sequence" | "seq" | "array" => "a list".to_owned(),
        "map" | "table" => "a table".to_owned(),
        _ => s.to_owned(),
    }
}

/// `found X, expected Y` for a value of the wrong type.
pub fn wrong_type(actual: &str, wanted: &str) -> String {
    format!("found {}, expected {}", found(actual), expected(wanted))
}

/// serde's "invalid type: X, expected Y" (and "invalid value: …") as
/// [`wrong_type`]; any other message as it is.
pub fn serde_message(message: &str) -> String {
    let message = message.trim();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((actual, wanted)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit_once(", expected "))
        {
            return wrong_type(actual, wanted);
        }
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_and_figment_types_in_plain_words() {
        let cases = [
            (
                "invalid type: string \"three\", expected u32",
                "found the text \"three\", expected a whole number",
            ),
            (
                "invalid type: integer `5`, expected a string",
                "found the number 5, expected text in quotes",
            ),
            (
                "invalid type: boolean `true`, expected usize",
                "found true, expected a whole number",
            ),
            (
                "invalid type: sequence, expected a boolean",
                "found a list, expected true or false",
            ),
            (
                "invalid type: floating point `1.5`, expected u64",
                "found the number 1.5, expected a whole number",
            ),
            (
                "invalid type: map, expected a sequence",
                "found a table, expected a list",
            ),
            ("missing field `url`", "missing field `url`"),
        ];
        for (serde, plain) in cases {
            assert_eq!(serde_message(serde), plain, "{serde}");
        }
        assert_eq!(
            wrong_type("signed int `5`", "usize"),
            "found the number 5, expected a whole number"
        );
        assert_eq!(
            wrong_type("string \"lots\"", "u32"),
            "found the text \"lots\", expected a whole number"
        );
    }
}
