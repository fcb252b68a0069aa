//! `#[derive(KindParams)]`: a stage kind's parameters declared once, as a typed struct.
//!
//! Each named field is one parameter: its name is the field's, its documentation the field's
//! doc comment (lines joined by spaces), its type the field's Rust type (through
//! `sdpipe_stages::params::ParamValue`) unless `#[param(...)]` says otherwise. The derive writes
//! `KindParams::specs` (what the engine validates and `sdpipe stages` prints) and
//! `KindParams::read` (the values back into the struct), so a parameter's name, type, default
//! and documentation are stated in one place.
//!
//! `#[param(...)]` options:
//! - `default = <json>`: optional with this default (written as `serde_json::json!` takes it:
//!   `512`, `"test"`, `null`, `[]`); without it the parameter is required.
//! - `min = <expr>`, `max = <expr>`: inclusive bounds of an integer or a number.
//! - `one_of = <expr>`: one of a `&'static [&'static str]` of names.
//! - `ty = <expr>`: the `ParamType` itself, for anything else.
//! - `input`: a binding to an upstream output (field type `Input` or `Option<Input>`).
//! - `path`: a file or folder in the project (field type `ProjectPath` or `Option<ProjectPath>`).
//! - `flatten`: the field is another `KindParams` struct whose parameters are this kind's too
//!   (parameters several kinds share).

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Expr, Fields, LitStr};

#[proc_macro_derive(KindParams, attributes(param))]
pub fn derive_kind_params(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// What a field's `#[param(...)]` says.
#[derive(Default)]
struct Options {
    default: Option<Tokens>,
    min: Option<Expr>,
    max: Option<Expr>,
    one_of: Option<Expr>,
    ty: Option<Expr>,
    input: bool,
    path: bool,
    flatten: bool,
}

fn options(field: &syn::Field) -> syn::Result<Options> {
    let mut o = Options::default();
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("param")) {
        attr.parse_nested_meta(|meta| {
            let name = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
            match name.as_str() {
                // Tokens up to the next comma: `null`, `[]` and `"x"` are json! input, not Rust.
                "default" => {
                    let value = meta.value()?;
                    let mut tokens = Tokens::new();
                    while !value.is_empty() && !value.peek(syn::Token![,]) {
                        let tt: proc_macro2::TokenTree = value.parse()?;
                        tokens.extend(std::iter::once(tt));
                    }
                    o.default = Some(tokens);
                }
                "min" => o.min = Some(meta.value()?.parse()?),
                "max" => o.max = Some(meta.value()?.parse()?),
                "one_of" => o.one_of = Some(meta.value()?.parse()?),
                "ty" => o.ty = Some(meta.value()?.parse()?),
                "input" => o.input = true,
                "path" => o.path = true,
                "flatten" => o.flatten = true,
                _ => return Err(meta.error("unknown `param` option")),
            }
            Ok(())
        })?;
    }
    Ok(o)
}

/// The doc comment, one paragraph: each line trimmed, joined by single spaces.
fn doc(field: &syn::Field) -> syn::Result<String> {
    let mut lines = Vec::new();
    for attr in &field.attrs {
        if !attr.path().is_ident("doc") {
            continue;
        }
        if let syn::Meta::NameValue(nv) = &attr.meta {
            if let Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) = &nv.value {
                let line = s.value();
                if !line.trim().is_empty() {
                    lines.push(line.trim().to_string());
                }
            }
        }
    }
    Ok(lines.join(" "))
}

fn expand(input: &DeriveInput) -> syn::Result<Tokens> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(input, "KindParams: a struct with named fields"));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(input, "KindParams: a struct with named fields"));
    };
    let api = quote!(::sdpipe_stages::params);
    let mut specs = Vec::new();
    let mut reads = Vec::new();
    for field in &fields.named {
        let ident = field.ident.as_ref().expect("named field");
        let ty = &field.ty;
        let o = options(field)?;
        if o.flatten {
            specs.push(quote!(specs.extend(<#ty as #api::KindParams>::specs());));
            reads.push(quote!(#ident: <#ty as #api::KindParams>::read(sources)?,));
            continue;
        }
        let param = LitStr::new(&ident.to_string(), ident.span());
        let text = doc(field)?;
        if text.is_empty() {
            return Err(syn::Error::new_spanned(field, "KindParams: document the parameter"));
        }
        let doc = LitStr::new(&text, ident.span());
        let param_type = if let Some(t) = &o.ty {
            quote!(#t)
        } else if let Some(names) = &o.one_of {
            quote!(#api::ParamType::Enum(#names))
        } else if o.input {
            quote!(#api::ParamType::Input)
        } else if o.path {
            quote!(#api::ParamType::Path)
        } else {
            let min = o.min.as_ref().map_or(quote!(None), |m| quote!(Some((#m) as f64)));
            let max = o.max.as_ref().map_or(quote!(None), |m| quote!(Some((#m) as f64)));
            quote!(#api::bounded(<#ty as #api::ParamValue>::param_type(), #min, #max))
        };
        let default = match &o.default {
            Some(tokens) => quote!(Some(#api::serde_json::json!(#tokens))),
            None => quote!(None),
        };
        specs.push(quote! {
            specs.push(#api::ParamSpec { name: #param, ty: #param_type, default: #default, doc: #doc });
        });
        let read = if o.input {
            quote!(sources.input(#param)?)
        } else if o.path {
            quote!(sources.path(#param)?)
        } else {
            quote!(sources.value(#param, &#param_type)?)
        };
        reads.push(quote!(#ident: #read,));
    }
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics #api::KindParams for #name #ty_generics #where_clause {
            fn specs() -> ::std::vec::Vec<#api::ParamSpec> {
                let mut specs = ::std::vec::Vec::new();
                #(#specs)*
                specs
            }
            fn read(sources: &#api::ParamSources<'_>) -> ::std::result::Result<Self, #api::StageError> {
                ::std::result::Result::Ok(Self { #(#reads)* })
            }
        }
    })
}
