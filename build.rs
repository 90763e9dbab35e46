// The migrations are embedded at compile time (`refinery::embed_migrations!` in src/db/migrate.rs),
// and cargo does not know a macro read them: without this, a new or edited migration was left out of
// the binary until something else changed.
fn main() {
    println!("cargo:rerun-if-changed=db/migrations");
}
