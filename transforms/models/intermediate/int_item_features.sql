-- every known item with its categorical indices (0 = value unknown or not seen in train)

with

items as (

    select * from {{ ref('stg_items') }}

),

feature_vocab as (

    select * from {{ ref('int_feature_vocab') }}

),

indexed as (

    select
        items.item_id,
        items.title,
        items.year,
        items.genres,
        items.primary_genre,
        items.release_decade,
        coalesce(genre_vocab.idx, 0) as genre_idx,
        coalesce(year_vocab.idx, 0) as year_idx
    from items
    left join feature_vocab as genre_vocab
        on genre_vocab.feature = 'genre'
        and genre_vocab.value = items.primary_genre
    left join feature_vocab as year_vocab
        on year_vocab.feature = 'year'
        and year_vocab.value = {{ dbt.cast('items.release_decade', dbt.type_string()) }}

)

select * from indexed
