with

source as (

    select * from {{ source('raw', 'items') }}

),

cleaned as (

    select
        {{ dbt.cast('item_id', dbt.type_bigint()) }} as item_id,
        title,
        {{ dbt.cast('year', dbt.type_int()) }} as year,
        -- MovieLens writes '(no genres listed)' for "none"
        case
            when trim(genres) in ('', '(no genres listed)') then null
            else genres
        end as genres

    from source

),

derived as (

    select
        item_id,
        title,
        year,
        genres,
        nullif(trim({{ dbt.split_part('genres', "'|'", 1) }}), '') as primary_genre,
        {{ dbt.cast('floor(year / 10.0) * 10', dbt.type_int()) }} as release_decade

    from cleaned

)

select * from derived
