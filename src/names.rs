//! Name tables of the vocabulary enums (model types, policies, eviction reasons, rejection
//! codes, ...). Each enum's names are written once, as strum attributes on its variants;
//! [`name_table!`](crate::name_table) derives from them everything that needs a name: `ALL`,
//! `as_str`, `Display`, `FromStr` with an error listing the accepted names, and serde (as the
//! name string). Used by the simulator's enums too.

/// `T`'s variant names, comma separated, for error messages.
pub fn names<T>() -> String
where
    T: strum::VariantArray + Copy + Into<&'static str>,
{
    T::VARIANTS.iter().map(|v| (*v).into()).collect::<Vec<&str>>().join(", ")
}

/// The variant of `T` named `s`, ignoring surrounding whitespace and ASCII case.
pub fn parse_by_name<T>(s: &str) -> Option<T>
where
    T: strum::VariantArray + Copy + Into<&'static str>,
{
    let s = s.trim();
    T::VARIANTS.iter().copied().find(|v| (*v).into().eq_ignore_ascii_case(s))
}

/// Implements the name-derived API of a vocabulary enum `$t` (which derives `Clone, Copy,
/// strum::IntoStaticStr, strum::VariantArray, strum::EnumCount`): `ALL` (every variant in
/// declaration order, so counters index by `v as usize`), `as_str`, `Display`, `FromStr` with
/// the error type `$err` ("unknown `$what` 'x': expected one of a, b, c"), and serde as the name.
#[macro_export]
macro_rules! name_table {
    ($t:ty, $err:ident, $what:literal) => {
        impl $t {
            /// Every variant, in declaration order (per-variant counters index by `v as usize`).
            pub const ALL: [Self; <Self as ::strum::EnumCount>::COUNT] =
                *<Self as ::strum::VariantArray>::VARIANTS.first_chunk().expect("one entry per variant");

            /// The variant's name: on the wire, in configs and flags, in logs and metrics.
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }

        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        #[doc = concat!("An unknown ", $what, " name; the message lists the accepted ones.")]
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $err(pub String);

        impl ::std::fmt::Display for $err {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                write!(f, "unknown {} '{}': expected one of {}", $what, self.0, $crate::names::names::<$t>())
            }
        }

        impl ::std::error::Error for $err {}

        impl ::std::str::FromStr for $t {
            type Err = $err;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::names::parse_by_name(s).ok_or_else(|| $err(s.trim().to_string()))
            }
        }

        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <::std::borrow::Cow<'de, str> as ::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}
