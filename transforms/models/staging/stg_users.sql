with

source as (

    select * from {{ source('raw', 'users') }}

),

renamed as (

    select
        {{ dbt.cast('user_id', dbt.type_bigint()) }} as user_id,
        nullif(upper(trim(gender)), '') as gender,
        {{ dbt.cast('age', dbt.type_int()) }} as age,
        nullif(trim(occupation), '') as occupation,
        nullif(trim(zip_code), '') as zip_code

    from source

)

select * from renamed
