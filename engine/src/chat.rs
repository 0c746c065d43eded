//! Chat prompts: the model's own `tokenizer.chat_template` (Jinja, rendered by minijinja),
//! or a plain fallback that says so.
//!
//! Message contents are untrusted: they are rendered as placeholders, and the rendered
//! template is tokenized piece by piece, template text with special tokens recognized and
//! contents without. `<|im_start|>` typed by a user stays text; a user cannot forge a turn.

use serde::Serialize;

use crate::EngineError;
use crate::tokenizer::TextTokenizer;

/// Longest chat template accepted.
const MAX_TEMPLATE: usize = 64 * 1024;
/// Placeholder delimiters: private-use characters no template emits.
const OPEN: char = '\u{F8F0}';
const CLOSE: char = '\u{F8F1}';

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat could not become a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template is {0} bytes, above the limit of {MAX_TEMPLATE}")]
    TooLong(usize),
    #[error("the model's chat template: {source}")]
    Parse { source: minijinja::Error },
    #[error("rendering the chat template: {source}")]
    Render { source: minijinja::Error },
    #[error("the template cut a message apart")]
    CutMessage,
    #[error("the template altered a message")]
    AlteredMessage,
    #[error("the template invented a message")]
    InventedMessage,
}

/// How a chat becomes a prompt.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: Option<String>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// `template`: the file's `tokenizer.chat_template`, if any.
    pub fn new(template: Option<String>, tok: &TextTokenizer) -> Result<Self, EngineError> {
        if let Some(t) = &template
            && t.len() > MAX_TEMPLATE
        {
            return Err(TemplateError::TooLong(t.len()).into());
        }
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
        Ok(Self {
            source: template,
            bos: text(tok.bos),
            eos: text(tok.eos),
        })
    }

    /// Whether the model brought its own template (else the plain fallback is used).
    pub fn is_fallback(&self) -> bool {
        self.source.is_none()
    }

    /// Renders `messages` with contents replaced by placeholders; returns the text and the
    /// contents in placeholder order.
    fn render(&self, messages: &[Message]) -> Result<String, EngineError> {
        let placeholders: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message::new(&m.role, &format!("{OPEN}{i}{CLOSE}")))
            .collect();
        let Some(source) = &self.source else {
            // Plain fallback: "role: content" lines, then the assistant's turn.
            let mut s = String::new();
            for m in &placeholders {
                s.push_str(&format!("{}: {}\n", m.role, m.content));
            }
            s.push_str("assistant:");
            return Ok(s);
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", source)
            .map_err(|source| TemplateError::Parse { source })?;
        let tmpl = env
            .get_template("chat")
            .map_err(|source| TemplateError::Parse { source })?;
        tmpl.render(minijinja::context! {
            messages => placeholders,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|source| TemplateError::Render { source }.into())
    }

    /// The prompt token ids for `messages` (BOS included when the model wants it and the
    /// template did not write it).
    pub fn encode(
        &self,
        tok: &TextTokenizer,
        messages: &[Message],
    ) -> Result<Vec<u32>, EngineError> {
        let rendered = self.render(messages)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(OPEN) {
            ids.extend(tok.encode(&rest[..start], true)?);
            let after = &rest[start + OPEN.len_utf8()..];
            let end = after.find(CLOSE).ok_or(TemplateError::CutMessage)?;
            let index: usize = after[..end]
                .parse()
                .map_err(|_| TemplateError::AlteredMessage)?;
            let content = messages.get(index).ok_or(TemplateError::InventedMessage)?;
            ids.extend(tok.encode(&content.content, false)?);
            rest = &after[end + CLOSE.len_utf8()..];
        }
        ids.extend(tok.encode(rest, true)?);
        if tok.bos.is_some() && ids.first() == tok.bos.as_ref() {
            return Ok(ids);
        }
        Ok(tok.with_bos(ids))
    }
}
